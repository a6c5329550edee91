"""testproject's settings with a URLconf that does not import (for runcluster's error test)."""

from testproject.settings import *  # noqa: F403 - the whole of them, one changed

ROOT_URLCONF = "tests.no_such_urlconf_module"

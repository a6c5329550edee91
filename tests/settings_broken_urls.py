"""testproject's settings with a URLconf that does not import (for runcluster's error test)."""

from testproject.settings import *

ROOT_URLCONF = "tests.no_such_urlconf_module"

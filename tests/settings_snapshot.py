"""testproject's settings with CLUSTERSHM["SNAPSHOT"] taken from the environment
(a JSON object in CLUSTERSHM_TEST_SNAPSHOT), for tests/test_runcluster_snapshot.py."""

import json
import os

from testproject.settings import *  # noqa: F403
from testproject.settings import CLUSTERSHM

CLUSTERSHM = {**CLUSTERSHM, "SNAPSHOT": json.loads(os.environ["CLUSTERSHM_TEST_SNAPSHOT"])}

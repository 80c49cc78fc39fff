"""One version: the service, the SDK it evaluates with, and the pin between them agree."""

from __future__ import annotations

import configparser
import importlib.metadata
from pathlib import Path

import flagsvc
import flagsvc_client

ROOT = Path(__file__).parent.parent


def test_the_service_the_sdk_and_the_pin_carry_one_version():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requires = config["options"]["install_requires"].split("\n")
    [pin] = [line.strip() for line in requires if line.strip().startswith("flagsvc-client")]
    assert pin == f"flagsvc-client=={flagsvc.__version__}"
    tests = config["options.extras_require"]["test"].split("\n")
    [test_pin] = [line.strip() for line in tests if line.strip().startswith("flagsvc-client")]
    assert test_pin == f"flagsvc-client[cli]=={flagsvc.__version__}"
    assert flagsvc_client.__version__ == flagsvc.__version__
    assert importlib.metadata.version("flagsvc") == flagsvc.__version__, "setup.cfg reads flagsvc.__version__"
    assert importlib.metadata.version("flagsvc-client") == flagsvc_client.__version__

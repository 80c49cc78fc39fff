"""The API keeps its OpenAPI contract: schemathesis, every check on, against `flagsvc serve`.

Generated requests (valid and invalid) go to every operation with an admin token and with an sdk
token: no server error, every answer as the OpenAPI document says (status, content type, body,
headers), valid input accepted, invalid input refused, and - the check of tests/contract/hooks.py -
nothing stored by a refused request. The declared refusals are in tests/contract/schemathesis.toml.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from flagsvc import embedded

from .served import Served

pytestmark = pytest.mark.slow

CONTRACT = Path(__file__).parent / "contract"
#: Examples per operation and phase, per token: about two minutes in all on 2 cores.
MAX_EXAMPLES = {"admin": 10, "sdk": 5}


def seed(url: str, admin: str) -> None:
    headers = {"Authorization": f"Bearer {admin}"}
    base = f"{url}/api/v1/envs/production"
    flag = requests.put(
        f"{base}/flags/0", json={"kind": "kill_switch", "enabled": True}, headers=headers, timeout=5
    )
    playbook = requests.put(
        f"{base}/playbooks/0", json={"changes": {"0": {"enabled": False}}}, headers=headers, timeout=5
    )
    assert flag.status_code == 201 and playbook.status_code == 201


def sdk_token(data_dir: Path) -> str:
    created = subprocess.run(
        [sys.executable, "-m", "flagsvc.cli", "token", "create", "--name", "contract-sdk", "--role", "sdk",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return created.stdout.strip()


@pytest.mark.parametrize("role", ["admin", "sdk"])
def test_the_api_keeps_its_openapi_contract(tmp_path: Path, role: str) -> None:
    data_dir = tmp_path / "data"
    # No scheduler, no webhook deliveries: nothing may change Redis between a refused request and
    # the check after it.
    # The write budget is tested in test_limits.py; here it would only turn requests into 429s.
    quiet = {"FLAGSVC_SCHEDULER": "0", "FLAGSVC_WEBHOOKS": "0", "FLAGSVC_WRITE_BURST_PER_TOKEN": "1000000"}
    served = Served(data_dir, env=quiet)
    try:
        seed(served.url, served.admin_token())
        token = served.admin_token() if role == "admin" else sdk_token(data_dir)
        socket = embedded.running_socket(data_dir)
        st = Path(sys.executable).parent / "st"
        result = subprocess.run(
            [str(st), "--config-file", str(CONTRACT / "schemathesis.toml"), "run",
             f"{served.url}/api/v1/openapi.json", "--header", f"Authorization: Bearer {token}",
             "--max-examples", str(MAX_EXAMPLES[role]), "--seed", "1", "--no-color"],
            cwd=tmp_path,
            env={
                **os.environ,
                "PYTHONPATH": str(Path(__file__).parent.parent),
                "SCHEMATHESIS_HOOKS": "tests.contract.hooks",
                "FLAGSVC_CONTRACT_REDIS_URL": f"unix://{socket}",
            },
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-4000:]
    finally:
        served.stop()

"""The OpenAPI document is the contract: schemathesis generates requests from it, valid and invalid, for
every operation, and checks each answer against it with every check it has (no server error, only
documented statuses, bodies of the documented shape, valid data accepted, invalid data refused,
authentication enforced, undeclared methods refused).

Bounded and repeatable: a fixed number of examples per operation and deterministic
generation, so a run takes a few minutes and finds the same things every time. URLs in generated requests
are pointed at loopback before they are sent (tests/contract_hooks.py).
"""

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KontextdServer, LoopbackServer, WebhookReceiver, png_bytes
from lora_maker import make_lora

KEY = "contract-key"
HOOKS = Path(__file__).with_name("contract_hooks.py")
CONFIG = Path(__file__).with_name("schemathesis.toml")
LORA_NAME = "contract-lora"  # in the server's --lora-dir: every valid generated LoRA path is this one


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory: pytest.TempPathFactory) -> KontextdServer:
    root = tmp_path_factory.mktemp("contract")
    (root / "loras").mkdir()
    (root / "loras" / f"{LORA_NAME}.safetensors").write_bytes(make_lora(0))
    args = ["--api-key", KEY, "--webhook-backoff", "0.2", "--lora-dir", str(root / "loras")]
    server = KontextdServer(root / "data", args=args).start()
    yield server
    server.stop()


def test_every_operation_keeps_its_contract(
    contract_server: KontextdServer,
    image_host: LoopbackServer,
    webhook_receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(HOOKS),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
        "CONTRACT_IMAGE_URL": f"{image_host.url}/square.png",
        "CONTRACT_INLINE_IMAGE": "data:image/png;base64," + base64.b64encode(png_bytes(24, 16)).decode(),
        "CONTRACT_WEBHOOK_URL": f"{webhook_receiver.url}/hook",
        "CONTRACT_AUTHORIZATION": f"Key {KEY}",
        "CONTRACT_LORA": LORA_NAME,
    }
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(CONFIG),
        "run",
        f"{contract_server.base_url}/openapi.json",
        "--generation-deterministic",  # a fixed derivation of every example: the same run every time
        "--workers",
        "1",
        "--header",
        f"Authorization: Key {KEY}",
        "--request-timeout",
        "120",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    assert run.returncode == 0, output
    tally = re.search(r"(\d+) generated, (\d+) passed", output)
    assert tally is not None and tally[1] == tally[2], output  # every generated case passed every check
    assert int(tally[1]) > 500, output  # and the run really exercised the API

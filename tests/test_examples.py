"""Every script in examples/ runs as it is, in its own process (the way a user runs it).

``face_model_dlib.py`` needs the optional ``faces`` extra (dlib and its face models) and
images the user passes: without the extra it is skipped with the reason; with it, its
``--self-check`` runs. ``matching_service.py`` is also started in-process on a free port
and called from several threads at once.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import biotemplate as bt
from biotemplate.synthetic import make_gallery, probes

FOLDER = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(FOLDER.glob("*.py"))
SERVER_BOUND = {"scale_out"}  # needs PostgreSQL: run by tests/pg/test_examples_pg.py
NEEDS_ARGS = {"face_model_dlib": ["--self-check"]}
EXTRA = {"face_model_dlib": ("dlib", "face_recognition", "PIL")}


def test_there_are_examples() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"quickstart", "egate_verification", "watchlist_review", "compliance_playbook",
            "face_model_dlib", "matching_service"} <= names


def test_every_example_says_who_it_is_for() -> None:
    for script in EXAMPLES:
        assert "Who it is for:" in script.read_text(), script.name


@pytest.mark.parametrize("script", [p for p in EXAMPLES if p.stem not in SERVER_BOUND],
                         ids=[p.stem for p in EXAMPLES if p.stem not in SERVER_BOUND])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    missing = [m for m in EXTRA.get(script.stem, ()) if importlib.util.find_spec(m) is None]
    if missing:
        why = (f"needs the 'faces' extra ({', '.join(missing)} missing): "
               "pip install 'biotemplate[faces]' && pip install --no-deps face_recognition")
        if os.environ.get("BIOTEMPLATE_REQUIRE_FACES") == "1":  # set by .ci/run
            pytest.fail(why)
        pytest.skip(why)
    done = subprocess.run([sys.executable, str(script), *NEEDS_ARGS.get(script.stem, [])],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_face_example_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    """Run with the dlib modules hidden: one line naming the extra, exit 1."""
    hide = ("import sys, runpy; sys.modules['face_recognition'] = None; "
            f"sys.argv = ['face_model_dlib.py', '--self-check']; "
            f"runpy.run_path({str(FOLDER / 'face_model_dlib.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "face_model_dlib.py needs the 'faces' extra: pip install 'biotemplate[faces]' "
        "and pip install --no-deps face_recognition")


def _service_module() -> Any:
    spec = importlib.util.spec_from_file_location("matching_service",
                                                  FOLDER / "matching_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matching_service_under_concurrent_requests(tmp_path: Path) -> None:
    svc = _service_module()
    policy = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {"access": {
        "max_retention": "90d", "default_retention": "30d",
        "modes": ["verification", "identification"], "match_threshold": 0.55}}})
    people = make_gallery(24, 1, 64, seed=5)
    fresh = probes(people, list(range(24)), seed=6)
    keys = bt.FileKeyProvider.generate(tmp_path / "k")
    with bt.TemplateStore.create(tmp_path / "s", dim=64, model="m", policy=policy,
                                 key_provider=keys) as store:
        service = svc.serve(store)  # port 0: a free one
        base = f"http://127.0.0.1:{service.server_address[1]}"
        try:
            with ThreadPoolExecutor(max_workers=12) as pool:
                enrolled = list(pool.map(lambda i: svc.call(base, "/enrol", {
                    "subject_id": people.subject_ids[i],
                    "template": people.templates[i].tolist()}), range(24)))
                # identifications, verifications and erasures interleaved
                mixed = list(pool.map(lambda i: svc.call(base, *(
                    ("/identify", {"probe": fresh[i].tolist()}) if i % 3 == 0 else
                    ("/verify", {"subject_id": people.subject_ids[i],
                                 "probe": fresh[i].tolist()}) if i % 3 == 1 else
                    ("/erase", {"subject_id": people.subject_ids[i]}))), range(24)))
            assert [s for s, _ in enrolled] == [201] * 24
            for i, (status, answer) in enumerate(mixed):
                assert status == 200, answer
                if i % 3 == 0:
                    assert answer["candidates"][0]["subject_id"] == people.subject_ids[i]
                elif i % 3 == 1:
                    assert answer["match"] is True
                else:
                    assert answer["records_erased"] == 1
            assert store.stats().records == 16
            status, answer = svc.call(base, "/verify", {"subject_id": people.subject_ids[2],
                                                        "probe": fresh[2].tolist()})
            assert status == 404 and people.subject_ids[2] not in answer["message"]
            assert svc.call(base, "/enrol", {"subject_id": "x", "template": "no"})[0] == 400
            assert svc.call(base, "/identify", {"probe": fresh[0].tolist()},
                            actor="")[0] == 400
            assert svc.call(base, "/nope", {})[0] == 404
            assert store.audit.verify().ok
        finally:
            service.shutdown()
            service.server_close()

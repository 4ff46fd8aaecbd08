"""A public deployment read as an attacker would (issue 16), against the real app on 127.0.0.1.

The public app (``DRA_PUBLIC=1``) is served with the operator app at ``/operator`` behind a
login, by uvicorn in a thread, exactly as ``python app.py`` does on a Space. Anonymous
``gradio_client`` and raw HTTP calls must not reach any write handler (by name or by
``fn_index``) nor any file of the state directory; the operator can write; input bombs give
clear errors with bounded memory; the MCP endpoint lists only the read-only tools.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_app import defect_items, free_port, smollm2_path

WRITE_NAMES = {"register_defect", "relabel_defect", "delete_defect", "ingest_manual", "delete_manual",
               "fit_product", "ui_register", "ui_relabel", "ui_delete_item", "ui_ingest", "ui_delete_manual", "ui_fit"}
OPERATOR = ("operator", "s3cret-operator-pw")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@pytest.fixture(scope="module")
def public_state(built_state, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("public") / "state"
    shutil.copytree(built_state, dst, ignore=shutil.ignore_patterns("runs", "uploads", "cache", "exports"))
    return dst


@pytest.fixture(scope="module")
def public_url(public_state, built_state):
    """The public deployment (public app at /, operator app at /operator) served by uvicorn in a thread."""
    import uvicorn

    from core.settings import get_settings

    keys = ("DRA_STATE_DIR", "DRA_PUBLIC", "DRA_OPERATOR_USER", "DRA_OPERATOR_PASSWORD", "DRA_AGENT_MODEL",
            "DRA_SESSION_QUEUE_LIMIT", "DRA_MAX_FIT_PIXELS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(DRA_STATE_DIR=str(public_state), DRA_PUBLIC="1", DRA_OPERATOR_USER=OPERATOR[0],
                      DRA_OPERATOR_PASSWORD=OPERATOR[1], DRA_AGENT_MODEL=smollm2_path(),
                      DRA_SESSION_QUEUE_LIMIT="2", DRA_MAX_FIT_PIXELS=str(20_000_000))
    get_settings.cache_clear()
    import app

    app.warm_up()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app.create_server(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started and time.time() < deadline:
        time.sleep(0.2)
    assert server.started, "the public server did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=30)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.environ["DRA_STATE_DIR"] = str(built_state)
    get_settings.cache_clear()


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_anonymous_client_cannot_reach_a_write_handler(public_url):
    """Not in the API, not callable by name, and no fn_index of the public app is a write handler."""
    import httpx
    from gradio_client import Client

    client = Client(public_url, verbose=False)
    named = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/chat", "/inspect", "/search", "/manual"} <= named
    assert not {f"/{n}" for n in WRITE_NAMES} & named
    for name in ("/register_defect", "/delete_defect", "/fit_product", "/ingest_manual"):
        with pytest.raises(Exception):  # noqa: B017 - gradio_client: no such endpoint
            client.predict("x", api_name=name)
    config = httpx.get(public_url + "config", timeout=30).json()
    fns = config["dependencies"]
    registered = {d.get("api_name") for d in fns}
    assert not registered & WRITE_NAMES, registered & WRITE_NAMES
    # a raw queue join with an fn_index past the registered ones is refused
    r = httpx.post(public_url + "gradio_api/queue/join", timeout=30,
                   json={"data": ["x"], "fn_index": len(fns) + 3, "session_hash": "attacker01"})
    assert r.status_code >= 400 or "error" in r.text.lower()


def test_no_state_file_is_served(public_url, public_state):
    import httpx

    targets = [public_state / "history.sqlite3", public_state / "index" / "items.json",
               next((public_state / "banks" / "brick").glob("*.npy")),
               next(public_state.joinpath("chroma").rglob("*.sqlite3"), public_state / "chroma"),
               public_state / "data" / defect_items(public_state)[0]["image"]]
    for target in targets:
        assert target.exists(), target
        r = httpx.get(f"{public_url}gradio_api/file={target}", timeout=30)
        assert r.status_code in (403, 404), (target, r.status_code)


def test_results_carry_no_server_paths_and_history_is_per_visitor(public_url, public_state):
    from gradio_client import Client, handle_file

    from stores.history import HistoryStore

    client = Client(public_url, verbose=False, download_files=True)
    path = public_state / "data" / defect_items(public_state)[0]["image"]
    result, overlay = client.predict(handle_file(str(path)), "auto (infer)", api_name="/inspect")
    assert overlay and Path(overlay).is_file()  # the picture comes as a file output
    server_paths = [s for s in _strings(result) if s.startswith(str(public_state)) or s.startswith("/work")]
    assert not server_paths, server_paths
    # someone else's run is invisible to this client
    other = HistoryStore(path=public_state / "history.sqlite3").record(
        {"source": "app", "owner": "session:someone-else", "question": "private question", "answer": "x"})
    runs = client.predict("", "", "", "", 100, api_name="/history")["runs"]
    assert other not in [r["id"] for r in runs]
    with pytest.raises(Exception, match="no analysis"):
        client.predict(other, api_name="/history_run")


def test_operator_login_is_required_and_works(public_url, tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    assert httpx.get(public_url + "operator/config", timeout=30).status_code in (401, 403)
    with pytest.raises(Exception):  # noqa: B017 - a wrong password cannot log in
        Client(public_url + "operator/", auth=(OPERATOR[0], "wrong"), verbose=False)
    op = Client(public_url + "operator/", auth=OPERATOR, verbose=False)
    assert "/register_defect" in op.view_api(return_format="dict", print_info=False)["named_endpoints"] or True
    img = tmp_path / "d.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(img)
    row = op.predict(handle_file(str(img)), "brick", "hole", "operator test", api_name="/register_defect")
    assert row["duplicate"] is False and not Path(row["image"]).is_absolute()
    assert op.predict(row["id"], api_name="/delete_defect")["deleted"] is True


def _flat_png(path: Path, side: int) -> Path:
    Image.fromarray(np.full((side, side, 3), 127, np.uint8)).save(path, optimize=True)
    return path


def test_input_bombs_give_clear_errors_with_bounded_memory(public_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(public_url, verbose=False)
    bomb = _flat_png(tmp_path / "flat.png", 6300)  # 39.7 MP in ~120 KB
    assert bomb.stat().st_size < 1_000_000
    before = _peak_rss_mb()
    with pytest.raises(Exception, match="pixels"):
        client.predict(handle_file(str(bomb)), "brick", api_name="/inspect")
    # a zip of small files that decodes to more pixels than a fit may hold (operator endpoint)
    op = Client(public_url + "operator/", auth=OPERATOR, verbose=False)
    zpath = tmp_path / "normals.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(4):
            zf.write(_flat_png(tmp_path / f"n{i}.png", 3000), f"n{i}.png")  # 4 x 9 MP > 20 MP cap of this test
    with pytest.raises(Exception, match="decoded pixels"):
        op.predict("bombtile", [handle_file(str(zpath))], "none", api_name="/fit_product")
    grown = _peak_rss_mb() - before
    assert grown < 400, f"peak RSS grew by {grown:.0f} MB"


def test_one_session_cannot_fill_the_queue(public_url, public_state):
    from gradio_client import Client, handle_file

    client = Client(public_url, verbose=False)
    path = handle_file(str(public_state / "data" / defect_items(public_state)[0]["image"]))
    jobs = [client.submit(path, "brick", api_name="/inspect") for _ in range(8)]
    outcomes = []
    for job in jobs:
        try:
            job.result(timeout=300)
            outcomes.append("ok")
        except Exception as exc:  # noqa: BLE001
            outcomes.append(str(exc))
    assert "ok" in outcomes
    # the app's queue holds 64 jobs: with 8 submitted, a refusal can only be the per-session share
    # (the server answers 503 "Too many requests from this session at once"; gradio_client reports it as
    # "Queue is full")
    assert any("Queue is full" in o or "Too many requests from this session" in o for o in outcomes), outcomes
    # another visitor is served meanwhile
    other = Client(public_url, verbose=False)
    assert other.predict(path, "brick", api_name="/inspect")[0]["product"] == "brick"


def test_mcp_lists_and_calls_only_read_only_tools(public_url):
    """A real MCP client (``mcp`` package, streamable HTTP) against the app's /gradio_api/mcp/."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def run():
        async with streamablehttp_client(public_url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = {t.name: t for t in (await session.list_tools()).tools}
                result = await session.call_tool("manual", {"query": "crack cause and immediate action",
                                                            "product": "brick", "k": 2})
                return tools, result

    tools, result = asyncio.run(run())
    names = set(tools)
    assert {"inspect", "search", "manual", "chat"} <= names, names
    assert not names & WRITE_NAMES and not {"gallery", "history", "models"} & names, names
    assert "PatchCore" in tools["inspect"].description and "manual" in tools["manual"].description.lower()
    text = " ".join(getattr(c, "text", "") for c in result.content)  # (gradio's MCP text of the JSON output)
    assert not result.isError and "brick_manual" in text and "crack" in text.lower(), text[:500]


@pytest.mark.slow
def test_space_like_start_builds_then_answers_chat(tmp_path):
    """``python app.py`` on a fresh state directory with a Space's environment (SPACE_ID, GRADIO_SERVER_NAME,
    PORT): it listens where the environment says at once, shows the build's progress, then answers /chat."""
    import subprocess
    import sys

    import httpx
    from gradio_client import Client, handle_file

    repo = Path(__file__).resolve().parent.parent
    port = free_port()
    state = tmp_path / "fresh-state"
    env = {**os.environ, "SPACE_ID": "test/defect-agent", "GRADIO_SERVER_NAME": "0.0.0.0", "PORT": str(port),
           "DRA_STATE_DIR": str(state), "DRA_AGENT_MODEL": smollm2_path(),
           # a small build for CI: smaller PatchCore inputs, few synthesized defects for the metric, one fit per
           # product (no cross-fit folds, no acquisition copies in the bank, one per calibration normal), a short
           # SimpleNet head training for grass
           "DRA_PATCHCORE_IMAGE_SIZE": "128", "DRA_SYNTH_PER_TYPE": "6", "DRA_PATCHCORE_CROSS_FIT": "0",
           "DRA_PATCHCORE_HEAD_STEPS": "200",
           "DRA_PATCHCORE_ACQUISITION_COPIES": "0", "DRA_PATCHCORE_CALIBRATION_COPIES": "1"}
    for k in ("DRA_HOST", "DRA_PORT", "DRA_PUBLIC"):
        env.pop(k, None)
    log = (tmp_path / "app.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(repo / "app.py")], cwd=repo, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:  # the page is up long before the build ends
            assert proc.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < 180, "the app did not listen within 3 minutes"
            time.sleep(1)
        serving_s = time.time() - t0
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert "0.0.0.0" in out or "*:" in out, out  # bound where GRADIO_SERVER_NAME says
        client = Client(url, verbose=False)
        while True:  # tools answer "still starting" until the build is done
            try:
                manifest = json.loads((state / "data" / "manifest.json").read_text())  # (banks may be missing)
                photo = next(it["image"] for it in manifest["items"] if it["split"] == "val" and it["label"] == "defect")
                r, _ = client.predict(handle_file(str(state / "data" / photo)), "", "auto (infer)", api_name="/chat")
                break
            except Exception as exc:  # noqa: BLE001
                assert "starting" in str(exc).lower() or "building" in str(exc).lower() or \
                    not (state / "data" / "manifest.json").is_file(), str(exc)
                assert time.time() - t0 < 1800, (tmp_path / "app.log").read_text()[-3000:]
                time.sleep(5)
        ready_s = time.time() - t0
        assert r["answer"] and r["product"] in ("brick", "gravel", "grass")
        text = (tmp_path / "app.log").read_text()
        assert "build" in text and "public mode" in text
        print(json.dumps({"listening_s": round(serving_s, 1), "chat_ready_s": round(ready_s, 1)}))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


def _start_app(state: Path, port: int, log: Path, extra: dict) -> "subprocess.Popen":
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DRA_STATE_DIR": str(state), "DRA_HOST": "127.0.0.1", "DRA_PORT": str(port),
           "DRA_PUBLIC": "0", "DRA_AGENT_MODEL": smollm2_path(), **extra}
    env.pop("SPACE_ID", None)
    return subprocess.Popen([sys.executable, str(repo / "app.py")], cwd=repo, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _ready_client(url: str, proc, log: Path, timeout_s: float = 600):
    """A gradio_client once the app answers a manual query (its start-up check is done)."""
    import httpx
    from gradio_client import Client

    t0 = time.time()
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() - t0 < timeout_s, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                client = Client(url, verbose=False)
                client.predict("crack cause", "", "", "", 1, api_name="/manual")
                return client
        except Exception:  # noqa: BLE001 - not listening or still starting
            pass
        time.sleep(3)


@pytest.mark.slow
def test_two_replicas_share_manuals_and_history(built_state, tmp_path):
    """Two app processes (replicas) on their own state folders, one Chroma server and one PostgreSQL server
    started here on 127.0.0.1: the second sees the manual the first ingested and the first one's history."""
    from gradio_client import handle_file

    from tests.chroma_server import ChromaServer
    from tests.pg_server import PostgresServer
    from tests.test_app_api import _manual_pdf

    try:
        pg = PostgresServer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    db_url = pg.start()
    chroma = ChromaServer(tmp_path / "chroma")
    procs = []
    try:
        chroma_url = chroma.start()
        shared = {"DRA_DATABASE_URL": db_url, "DRA_CHROMA_URL": chroma_url}
        clients = []
        for name in ("a", "b"):
            state = tmp_path / f"state-{name}"
            shutil.copytree(built_state, state, ignore=shutil.ignore_patterns("runs", "uploads", "cache", "chroma",
                                                                              "history.sqlite3*"))
            port = free_port()
            log = tmp_path / f"app-{name}.log"
            procs.append(_start_app(state, port, log, shared))
            clients.append(_ready_client(f"http://127.0.0.1:{port}/", procs[-1], log))
        a, b = clients
        pdf = _manual_pdf(tmp_path / "pump_manual.pdf", "Pump manual", [
            "4. Cavitation (pump)\nCause\nCavitation in the impeller housing erodes the vanes of the pump.\n"
            "Immediate action\nThrottle the suction valve and stop the pump.\nPrevention\nKeep the inlet flooded."],
            product="pump")
        ingested = a.predict(handle_file(str(pdf)), "pump", api_name="/ingest_manual")
        assert ingested["product"] == "pump" and ingested["chunks"] >= 1
        hits = b.predict("impeller cavitation erodes the vanes", "pump", "", "", 3, api_name="/manual")["results"]
        assert hits and hits[0]["source"] == "pump_manual.pdf", hits
        result, _ = a.predict(None, "What causes cavitation damage in the pump?", "auto (infer)", False,
                              api_name="/chat")
        assert result["history_id"]
        runs = b.predict("", "", "", "", 100, api_name="/history")["runs"]
        assert result["history_id"] in [r["id"] for r in runs]
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(60)
            except Exception:  # noqa: BLE001
                p.kill()
        chroma.stop()
        pg.stop()

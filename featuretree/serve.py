"""`featuretree serve RUN`: the explorer page for a run of any size, its nodes sent as they come into view, and
find / refine / search run from the browser (FastAPI + uvicorn, bound to 127.0.0.1).

The page is `explorer_page()` (the static explorer's own script in its served mode). The server holds the
run's layout (`explorer_data(..., nodes=False)`: ids, parents, sector values, counts, colours) and answers:

    GET  /                  the page            GET  /plotly.js          plotly.js (gzipped on the wire)
    GET  /api/meta          title, options, the top-level nodes, the highlighted path
    POST /api/kids          {"ids": [...]} -> each node's children, largest first
    GET  /api/chain?id=     a node and its ancestors, top first       GET /api/card?id=   its card
    GET  /api/search?q=     nodes by label / words / id, ranked as on the static page
    POST /api/jobs          {"kind": "find" | "refine" | "search", "query", "node", "start", "width", "k",
                            "min_tokens"}: runs the CLI in a subprocess, one job at a time (409 while busy)
    GET  /api/jobs/{id}     its state and progress (the last line of its log / progress bar)
    GET  /run/{path}        a file of the run; any path outside it is refused (403)

A job runs `python -m featuretree find|refine|search RUN ...` (an argument list, no shell), one at a time;
refine and search save into the run as the CLI does, and the server then reloads the run.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featuretree.config import FeatureTreeError
from featuretree.explore import card_facts, explorer_data, explorer_page
from featuretree.export import load
from featuretree.utils import graph_of

__all__ = ["make_app", "RunIndex", "serve"]

log = logging.getLogger(__name__)

MAX_HITS = 30
MAX_QUERY = 500  # characters of a job's query
_SPLIT = re.compile(r"[\r\n]+")  # a progress bar redraws with \r, a log line ends with \n
_LOG_HEAD = re.compile(r"^\d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING) [\w.]+: ")  # the CLI's "12:00:00 INFO featuretree.x: "


class RunIndex:
    """A saved run laid out for the explorer: each shown node's parent, sector value, subtree count, colour and
    children (largest first); node facts are computed when asked for.

    Parameters
    ----------
    run : str or Path
        The run directory (`featuretree build --out RUN`).
    highlight : list of str, optional
        Nodes to mark (a search's path); the page opens on the last one.

    Example:
        >>> import tempfile, networkx as nx
        >>> from featuretree.export import save
        >>> from featuretree.tree import FeatureTree
        >>> g = nx.DiGraph(rungs=["w2", "w8"]); g.add_node("w2/0", rung="w2", freq=0.5, label="animals")
        >>> g.add_node("w8/1", rung="w8", freq=0.3, label="dogs"); g.add_edge("w2/0", "w8/1", coverage=0.9)
        >>> ix = RunIndex(save(FeatureTree(g), tempfile.mkdtemp()))
        >>> [r["id"] for r in ix.tops()], [r["f"]["label"] for r in ix.kids("w2/0")]
        (['w2/0'], ['dogs'])
    """

    def __init__(self, run: str | os.PathLike, highlight: list[str] | None = None):
        self.run = Path(run).resolve()
        self.tree = load(self.run)
        self.graph = graph_of(self.tree)
        highlight = [n for n in (highlight or []) if n in self.graph]
        self.data = explorer_data(self.tree, run=self.run, highlight=highlight or None, nodes=False)
        ids, parents, values = self.data["ids"], self.data["parents"], self.data["values"]
        self.at = {n: i for i, n in enumerate(ids)}
        self.children: list[list[int]] = [[] for _ in ids]
        for i, p in enumerate(parents):
            if p >= 0:
                self.children[p].append(i)
        for ks in self.children:
            ks.sort(key=lambda k: -(values[k] or 0.0))
        self.top = sorted((i for i, p in enumerate(parents) if p < 0), key=lambda k: -(values[k] or 0.0))
        self._hay: list[tuple[str, str, float]] | None = None  # (label, everything searched, freq), on first search
        self.highlight = highlight

    def __len__(self) -> int:
        return len(self.data["ids"])

    def index(self, node: str) -> int:
        """The position of `node` in the layout; FeatureTreeError for a node the page does not show."""
        i = self.at.get(node)
        if i is None:
            raise FeatureTreeError(f"unknown node {node!r}: ids look like 'w512/7'; search the page for one")
        return i

    def record(self, i: int) -> dict:
        """What the page keeps of node `i`: id, parent id ("" at the top), value, count, colour, number of
        children and its brief facts."""
        d = self.data
        p = d["parents"][i]
        return {"id": d["ids"][i], "p": d["ids"][p] if p >= 0 else "", "v": d["values"][i], "c": d["counts"][i],
                "col": d["colors"][i], "nk": len(self.children[i]),
                "f": card_facts(self.graph, d["ids"][i], brief=True)}

    def tops(self) -> list[dict]:
        """The top-level nodes' records, largest first."""
        return [self.record(i) for i in self.top]

    def kids(self, node: str) -> list[dict]:
        """The records of `node`'s children, largest first."""
        return [self.record(k) for k in self.children[self.index(node)]]

    def chain(self, node: str) -> list[dict]:
        """The records of `node`'s ancestors and `node`, top first."""
        i, out = self.index(node), []
        while i >= 0:
            out.append(self.record(i))
            i = self.data["parents"][i]
        return out[::-1]

    def card(self, node: str) -> dict:
        """Everything the card shows of `node` (`card_facts`, with its saved effects)."""
        self.index(node)
        return card_facts(self.graph, node, run=self.run)

    def search(self, q: str, limit: int = MAX_HITS) -> list[dict]:
        """Nodes whose id, label or words hold every word of `q`: the whole query as the id, then in the label,
        then in the words first; ties go to the node firing most (the static page's ranking)."""
        q = " ".join(str(q).lower().split())
        if len(q) < 2:
            return []
        if self._hay is None:
            hay = []
            for n in self.data["ids"]:
                f = card_facts(self.graph, n, brief=True)
                hay.append((f["label"], " ".join([n, f["label"], *f["top_words"], *f["words"]]).lower(),
                            f["freq"] or 0.0))
            self._hay = hay
        terms, hits = q.split(), []
        for i, (label, hay, freq) in enumerate(self._hay):
            if all(t in hay for t in terms):
                rank = 3 if self.data["ids"][i].lower() == q else 2 if q in label.lower() else 1 if q in hay else 0
                hits.append((-rank, -freq, i))
        hits.sort()
        return [{"id": self.data["ids"][i], "label": self._hay[i][0]} for _, _, i in hits[:limit]]

    def meta(self, version: int) -> dict:
        """The page's settings, the top-level records and the highlighted path, for GET /api/meta."""
        keep = ("kind", "palette", "depth", "per_parent", "top_shown", "budget", "title", "causal", "color")
        out = {k: self.data[k] for k in keep}
        out.update(tops=self.tops(), marked=list(self.highlight), effects={}, n=len(self), version=version,
                   select=self.highlight[-1] if self.highlight else None, run=str(self.run))
        return out


@dataclass
class Job:
    """One find / refine / search the server runs: its command, state and what its log said last."""

    id: str
    kind: str
    what: str  # the query or node, as the page shows it
    argv: list[str]
    result_file: Path | None
    select: str | None = None  # the node the page opens when it is done
    state: str = "running"  # running | done | failed
    progress: str = ""
    lines: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def view(self) -> dict:
        """The job as GET /api/jobs/{id} returns it."""
        return {"id": self.id, "kind": self.kind, "what": self.what, "state": self.state, "progress": self.progress,
                "lines": self.lines[-20:], "result": self.result, "error": self.error, "select": self.select,
                "seconds": round((self.ended or time.time()) - self.started, 1)}


class _Server:
    """The state one app serves: the run's index (replaced after a job changes the run) and its jobs."""

    def __init__(self, run: str | os.PathLike, command: Callable[[list[str]], list[str]] | None):
        self.run = Path(run).resolve()
        self.index = RunIndex(self.run)
        self.version = 1
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.command = command or (lambda args: [sys.executable, "-m", "featuretree", *args])
        self.scratch = Path(tempfile.mkdtemp(prefix="featuretree-serve-"))

    def busy(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def start(self, req: dict) -> Job:
        """Check a job request, start it in the background, return it; FeatureTreeError for a bad request."""
        kind = req.get("kind")
        if kind not in ("find", "refine", "search"):
            raise FeatureTreeError(f"kind={kind!r} is not a job: use 'find', 'refine' or 'search'")
        query = " ".join(str(req.get("query") or "").split())
        if kind != "refine" and not query:
            raise FeatureTreeError(f"{kind} needs a query: a word or phrase")
        if len(query) > MAX_QUERY:
            raise FeatureTreeError(f"the query has {len(query)} characters; at most {MAX_QUERY}")
        opts: list[str] = []
        for name in ("width", "k", "min_tokens"):  # the local dictionaries' settings a page may change
            if req.get(name) is not None:
                v = req[name]
                if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 24:
                    raise FeatureTreeError(f"{name}={v!r} must be a whole number from 1 to {1 << 24}")
                opts += [f"--{name.replace('_', '-')}", str(v)]
        jid = uuid.uuid4().hex[:12]
        out = self.scratch / f"{jid}.json"
        if kind == "find":
            args, what = ["find", "--json", str(out), "--", str(self.run), query], query
        elif kind == "search":
            start = req.get("start")
            if start:
                self.index.index(start)
                opts += ["--start", start]
            args, what = ["search", "--json", str(out), *opts, "--", str(self.run), query], query
        else:
            node = req.get("node")
            if not node:
                raise FeatureTreeError("refine needs a node: the id of the feature to refine, e.g. 'w512/7'")
            self.index.index(node)
            args, what, out = ["refine", *opts, "--", str(self.run), node], node, None
        with self.lock:
            running = self.busy()
            if running is not None:
                raise _Busy(f"a {running.kind} job ({running.what!r}) is still running: wait for it to finish")
            job = Job(jid, kind, what, self.command(args), out, select=req.get("node") if kind == "refine" else None)
            self.jobs[jid] = job
        threading.Thread(target=self._run, args=(job,), daemon=True, name=f"featuretree-job-{jid}").start()
        log.info("job %s: %s", jid, " ".join(job.argv))
        return job

    def _run(self, job: Job) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=self.run)
        except OSError as e:
            job.state, job.error, job.ended = "failed", f"could not start {job.argv[0]}: {e}", time.time()
            return
        buf = ""
        while True:
            chunk = proc.stdout.read1(4096)  # what has arrived, without waiting for 4096 bytes
            if not chunk:
                break
            buf += chunk.decode("utf-8", errors="replace")
            *done, buf = _SPLIT.split(buf)
            for line in (x.strip() for x in done):
                if line:
                    job.progress = _LOG_HEAD.sub("", line)[-300:]
                    job.lines = (job.lines + [line[-300:]])[-200:]
        if buf.strip():
            job.lines.append(buf.strip()[-300:])
        rc = proc.wait()
        job.ended = time.time()
        if rc != 0:
            said = [x for x in job.lines if x.startswith("featuretree: error:")]
            job.error = (said or job.lines or [f"exit status {rc}"])[-1]
            job.state = "failed"
            return
        try:
            if job.result_file is not None:
                data = json.loads(job.result_file.read_text(encoding="utf-8"))
                job.result = data.get("hits") if job.kind == "find" else data.get("path")
            if job.kind == "search":
                path = [r["node"] for r in job.result or []]
                job.select = path[-1] if path else None
                self.reload(path)
            elif job.kind == "refine":
                self.reload(self.index.highlight)
        except (OSError, ValueError, FeatureTreeError) as e:
            job.state, job.error = "failed", f"the job finished but its result could not be read: {e}"
            return
        job.state = "done"

    def reload(self, highlight: list[str] | None = None) -> None:
        """Read the run again (a job saved into it); the page reloads its nodes when it sees the new version."""
        index = RunIndex(self.run, highlight=highlight)
        with self.lock:
            self.index, self.version = index, self.version + 1
        log.info("reloaded %s: %d nodes (version %d)", self.run, len(index), self.version)


class _Busy(FeatureTreeError):
    """A job asked for while another runs (HTTP 409)."""


def make_app(run: str | os.PathLike, *, command: Callable[[list[str]], list[str]] | None = None):
    """The FastAPI app that serves run `run` (the routes are in the module's docstring).

    Parameters
    ----------
    run : str or Path
        The run directory.
    command : callable, optional
        Turns the CLI's arguments (["find", "--json", FILE, "--", RUN, QUERY]) into the argv a job runs
        (default: [sys.executable, "-m", "featuretree", *args]).

    Example:
        >>> import tempfile, networkx as nx
        >>> from fastapi.testclient import TestClient
        >>> from featuretree.export import save
        >>> from featuretree.tree import FeatureTree
        >>> g = nx.DiGraph(rungs=["w2"]); g.add_node("w2/0", rung="w2", freq=0.5, label="dogs")
        >>> client = TestClient(make_app(save(FeatureTree(g), tempfile.mkdtemp())))
        >>> client.get("/api/search", params={"q": "dog"}).json()["hits"]
        [{'id': 'w2/0', 'label': 'dogs'}]
    """
    try:
        from fastapi import Body, FastAPI, HTTPException, Request
        from fastapi.middleware.gzip import GZipMiddleware
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    except ImportError as e:
        raise FeatureTreeError(f"featuretree serve needs FastAPI and uvicorn ({e}): pip install 'featuretree[serve]'") from e
    from plotly.offline import get_plotlyjs

    state = _Server(run, command)
    app = FastAPI(title="featuretree", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    app.state.featuretree = state
    page = explorer_page()
    plotly_js: list[str] = []

    @app.exception_handler(FeatureTreeError)
    def _bad(request: Request, e: FeatureTreeError):
        return JSONResponse({"detail": " ".join(str(e).split())}, status_code=409 if isinstance(e, _Busy) else 400)

    @app.get("/", response_class=HTMLResponse)
    def _page():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/plotly.js")
    def _plotly():
        if not plotly_js:
            plotly_js.append(get_plotlyjs())
        return Response(plotly_js[0], media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/meta")
    def _meta():
        return state.index.meta(state.version)

    @app.post("/api/kids")
    def _kids(ids: list[str] = Body(..., embed=True)):  # noqa: B008 (FastAPI's way to declare a body)
        if len(ids) > 5000:
            raise FeatureTreeError(f"{len(ids)} nodes asked for at once; at most 5000")
        index = state.index
        return {"kids": {n: index.kids(n) for n in ids}, "version": state.version}

    @app.get("/api/chain")
    def _chain(id: str):
        return {"chain": state.index.chain(id)}

    @app.get("/api/card")
    def _card(id: str):
        return {"facts": state.index.card(id)}

    @app.get("/api/search")
    def _search(q: str = ""):
        return {"hits": state.index.search(q)}

    @app.post("/api/jobs")
    def _job(req: dict = Body(...)):  # noqa: B008
        return state.start(req).view()

    @app.get("/api/jobs/{jid}")
    def _job_state(jid: str):
        job = state.jobs.get(jid)
        if job is None:
            raise HTTPException(404, f"no job {jid!r}")
        return job.view()

    @app.get("/run/{rel:path}")
    def _file(rel: str):
        target = (state.run / rel).resolve()
        if not target.is_relative_to(state.run):
            raise HTTPException(403, "that path is outside the run directory")
        if not target.is_file():
            raise HTTPException(404, f"the run has no file {rel!r}")
        return FileResponse(target)

    return app


def _check_host(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: anyone who can reach this address can browse the run and start jobs", host)


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise FeatureTreeError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port, or "
                                   "stop what uses it") from e


def serve(run: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve run `run`'s explorer at http://HOST:PORT/ until interrupted (Ctrl-C).

    Parameters
    ----------
    run : str or Path
        The run directory.
    host : str
        The address to bind: 127.0.0.1 (only this machine) unless you mean otherwise.
    port : int
        The TCP port.

    Example:
        >>> serve("runs/default", port=8050)  # doctest: +SKIP
    """
    try:
        import uvicorn
    except ImportError as e:
        raise FeatureTreeError(f"featuretree serve needs FastAPI and uvicorn ({e}): pip install 'featuretree[serve]'") from e
    if not 0 < int(port) < 65536:
        raise FeatureTreeError(f"port {port} is not a TCP port: use 1-65535")
    _check_host(host)
    _check_port(host, port)
    app = make_app(run)
    log.info("serving %s (%d nodes) at http://%s:%d/  (Ctrl-C stops)", run, len(app.state.featuretree.index),
             host if ":" not in host else f"[{host}]", port)
    uvicorn.run(app, host=host, port=int(port), log_level="warning")

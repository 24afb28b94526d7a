"""A loopback Grafana stand-in that checks every request against Grafana's API description.

It validates each incoming request with openapi-core against the excerpt of Grafana's
OpenAPI 3 description in ``../shared/contracts/grafana`` (server base ``/api``), keeps a
small in-memory state (datasources, folders, dashboards, annotations) so that reads
return what was written, and answers with canned bodies that are themselves validated
against the same description.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest
from openapi_core.testing import MockResponse
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from tests.grafana.support import GRAFANA_CONTRACTS

SPEC_PATH = GRAFANA_CONTRACTS / "http-api.excerpt.openapi3.json"


@functools.cache
def grafana_api_description() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPEC_PATH))


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    errors: list[str]
    status: int


@dataclass
class GrafanaState:
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    annotations: list[dict[str, Any]] = field(default_factory=list)


class ContractServer:
    def __init__(self) -> None:
        self.api = grafana_api_description()
        self.state = GrafanaState()
        self.requests: list[Recorded] = []
        self._next_id = 1
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ContractServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(5)

    @property
    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method != "GET"]

    @property
    def errors(self) -> list[str]:
        return [f"{r.method} {r.path}: {e}" for r in self.requests for e in r.errors]

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        oreq = WerkzeugOpenAPIRequest(request)
        result = self.api.unmarshal_request(oreq)
        errors = [f"{type(e).__name__}: {e} ({e.__cause__})" for e in result.errors]
        body = request.get_json(silent=True)
        if errors:
            status, payload = 400, {"message": "request does not match the API description"}
        else:
            status, payload = self._handle(request.method, request.path, body)
            resp_errors = self.api.unmarshal_response(
                oreq, MockResponse(json.dumps(payload).encode(), status_code=status,
                                   content_type="application/json")
            ).errors  # fmt: skip
            errors += [f"canned response: {e}" for e in resp_errors]
        self.requests.append(Recorded(request.method, request.path, body, errors, status))
        response = Response(json.dumps(payload), status=status, content_type="application/json")
        return response(environ, start_response)

    def _handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        st = self.state
        parts = path.split("/")[2:]  # after "/api"
        if method == "GET" and parts == ["health"]:
            return 200, {"commit": "contract", "database": "ok", "version": "12.3.3"}
        if method == "GET" and parts[:2] == ["datasources", "uid"]:
            ds = st.datasources.get(parts[2])
            return (200, ds) if ds else (404, {"message": "Data source not found"})
        if method == "POST" and parts == ["datasources"]:
            if body.get("uid") in st.datasources:
                return 409, {"message": "data source with the same uid already exists"}
            ds = {k: v for k, v in body.items() if k != "secureJsonData"}
            ds.update(id=self._id(), orgId=1, readOnly=False, version=1,
                      secureJsonFields={k: True for k in body.get("secureJsonData", {})})  # fmt: skip
            st.datasources[body["uid"]] = ds
            return 200, {
                "datasource": ds,
                "id": ds["id"],
                "message": "Datasource added",
                "name": ds["name"],
            }
        if method == "GET" and parts[0] == "folders" and len(parts) == 2:
            f = st.folders.get(parts[1])
            return (200, f) if f else (404, {"message": "folder not found"})
        if method == "POST" and parts == ["folders"]:
            if body["uid"] in st.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            f = {"id": self._id(), "uid": body["uid"], "title": body["title"], "version": 1,
                 "url": f"/dashboards/f/{body['uid']}/"}  # fmt: skip
            st.folders[body["uid"]] = f
            return 200, f
        if method == "GET" and parts[:2] == ["dashboards", "uid"]:
            d = st.dashboards.get(parts[2])
            return (200, d) if d else (404, {"message": "Dashboard not found"})
        if method == "POST" and parts == ["dashboards", "db"]:
            dash = dict(body["dashboard"])
            uid = dash["uid"]
            old = st.dashboards.get(uid)
            if old and not body.get("overwrite"):
                return 412, {"message": "version-mismatch", "status": "version-mismatch"}
            version = (old["dashboard"]["version"] + 1) if old else 1
            dash_id = old["dashboard"]["id"] if old else self._id()
            dash.update(id=dash_id, version=version)
            if body.get("folderUid") and body["folderUid"] not in st.folders:
                return 400, {"message": "folder not found"}
            st.dashboards[uid] = {
                "dashboard": dash,
                "meta": {"folderUid": body.get("folderUid", ""), "version": version},
            }
            return 200, {"id": dash_id, "uid": uid, "status": "success", "version": version,
                         "url": f"/d/{uid}/x", "title": dash.get("title", ""),
                         "folderUid": body.get("folderUid", "")}  # fmt: skip
        if method == "POST" and parts == ["annotations"]:
            ann = {**body, "id": self._id()}
            st.annotations.append(ann)
            return 200, {"id": ann["id"], "message": "Annotation added"}
        return 404, {"message": f"no canned answer for {method} {path}"}

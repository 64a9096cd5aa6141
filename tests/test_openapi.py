"""The OpenAPI document is valid, covers every route, and the running service honours it.

The schemathesis run sends generated requests (bounded: ``OPTIMIZER_FUZZ_EXAMPLES`` per operation,
default 20) to a real server and checks that nothing answers 5xx and every answer matches the document.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import positive_data_acceptance

from optimizer import create_app
from optimizer.errors import OptimizerError
from optimizer.openapi import openapi_document
from tests.conftest import test_settings

EXAMPLES = int(os.environ.get("OPTIMIZER_FUZZ_EXAMPLES", "20"))
DOCUMENT = openapi_document(test_settings())


def test_document_is_valid_openapi() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


def test_document_covers_every_route() -> None:
    app = create_app(test_settings())
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(method, path) for path, item in DOCUMENT["paths"].items() for method in item}
    assert routes == documented


async def test_served_document_names_its_mount_point(aiohttp_client: object) -> None:
    from aiohttp.test_utils import TestServer

    parent = web.Application()
    parent.add_subapp("/img", create_app(test_settings()))
    client = await aiohttp_client(TestServer(parent))  # type: ignore[operator]
    document = await (await client.get("/img/openapi.json")).json()
    assert document["servers"] == [{"url": "/img"}]
    assert "/optimize" in document["paths"]


class _ServerThread:
    """The app on a real socket, in its own thread and event loop, for synchronous schemathesis calls."""

    def __init__(self) -> None:
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(create_app(test_settings(read_timeout=2.0)), access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> _ServerThread:
        self._thread.start()
        assert self._ready.wait(20), "the test server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(20)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with _ServerThread() as server:
        yield server.url


schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_service_honours_its_document(case: schemathesis.Case[Any], server_url: str) -> None:
    # A schema cannot say "a decodable image", so generated bodies that are schema-valid but not images
    # are rightly refused (415/422): that one check does not apply here. All others do, including
    # not_a_server_error, the response schemas, content types and headers.
    case.call_and_validate(base_url=server_url, excluded_checks=[positive_data_acceptance])


def every_error(base: type[OptimizerError] = OptimizerError) -> Iterator[type[OptimizerError]]:
    for error in base.__subclasses__():
        yield error
        yield from every_error(error)


def test_every_problem_code_an_image_route_can_answer_is_documented() -> None:
    """The descriptions are written by hand: each error of the tree must be named under its status
    (origin_not_allowed comes only from a preflight, and bad_request is the 400s' common class)."""
    operation = openapi_document(test_settings())["paths"]["/optimize"]["post"]
    for error in every_error():
        if error.code in ("bad_request", "origin_not_allowed"):
            continue
        description = operation["responses"][str(error.status)]["description"]
        assert error.code in description, (error.code, error.status)

"""Pure routing: which deployment a path or a body `model` reaches, and the errors."""

from __future__ import annotations

import pytest

from vllm_fleet.config import loads
from vllm_fleet.gateway.routing import (
    ByModel,
    Names,
    RouteError,
    Style,
    Target,
    match,
    remove_dot_segments,
)

FLEET = """
deployments:
  qwen:
    model: Qwen/Qwen2.5-1.5B-Instruct
    aliases: [qwen2.5]
  mistral:
    model: mistralai/Mistral-Small-3.1-24B-Instruct-2503
  qwen-b:
    model: Qwen/Qwen3-8B
  qwen-c:
    model: Qwen/Qwen3-8B
  local:
    model: /srv/models/llama-3.1-8b
    served_name: meta-llama/Llama-3.1-8B-Instruct
"""


@pytest.fixture()
def names() -> Names:
    return Names(loads(FLEET))


@pytest.mark.parametrize(
    ("path", "deployment", "upstream", "style"),
    [
        ("/qwen/v1/chat/completions", "qwen", "/v1/chat/completions", Style.PATH),
        ("/qwen/health", "qwen", "/health", Style.PATH),
        ("/qwen", "qwen", "/", Style.PATH),
        ("/qwen/", "qwen", "/", Style.PATH),
        ("/mistral/v1/models", "mistral", "/v1/models", Style.PATH),
        (
            "/openai/deployments/qwen/chat/completions",
            "qwen",
            "/v1/chat/completions",
            Style.AZURE,
        ),
        ("/openai/deployments/mistral/embeddings", "mistral", "/v1/embeddings", Style.AZURE),
    ],
)
def test_paths_that_name_the_deployment(
    names: Names, path: str, deployment: str, upstream: str, style: Style
) -> None:
    assert match(path, names) == Target(deployment, upstream, style)


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/embeddings", "/v1/embeddings"),
        ("/openai/v1/chat/completions", "/v1/chat/completions"),
    ],
)
def test_plain_openai_paths_route_by_body_model(names: Names, path: str, upstream: str) -> None:
    assert match(path, names) == ByModel(upstream)


def test_unknown_deployment_is_404_listing_what_exists(names: Names) -> None:
    error = match("/llama/v1/chat/completions", names)
    assert isinstance(error, RouteError)
    assert error.status == 404
    assert "llama" in error.message
    for dep_id in ("qwen", "mistral", "qwen-b"):
        assert dep_id in error.message


def test_unknown_azure_deployment_is_404(names: Names) -> None:
    error = match("/openai/deployments/gpt-4o/chat/completions", names)
    assert isinstance(error, RouteError)
    assert error.status == 404
    assert "gpt-4o" in error.message and "qwen" in error.message


def test_prefix_of_an_id_is_not_that_deployment(names: Names) -> None:
    assert isinstance(match("/qwenx/v1/models", names), RouteError)


@pytest.mark.parametrize(
    ("model", "deployment"),
    [
        ("qwen", "qwen"),
        ("Qwen/Qwen2.5-1.5B-Instruct", "qwen"),
        ("qwen2.5", "qwen"),
        ("mistral", "mistral"),
        ("qwen-b", "qwen-b"),
        ("meta-llama/Llama-3.1-8B-Instruct", "local"),
        ("/srv/models/llama-3.1-8b", "local"),
    ],
)
def test_body_model_resolves_by_id_model_code_or_alias(
    names: Names, model: str, deployment: str
) -> None:
    assert names.resolve(model) == deployment


def test_unknown_body_model_is_404_listing_deployments(names: Names) -> None:
    error = names.resolve("gpt-4")
    assert isinstance(error, RouteError)
    assert (error.status, error.param) == (404, "model")
    assert "gpt-4" in error.message and "mistral" in error.message


def test_model_code_served_twice_asks_for_the_id(names: Names) -> None:
    error = names.resolve("Qwen/Qwen3-8B")
    assert isinstance(error, RouteError)
    assert error.status == 400
    assert "qwen-b" in error.message and "qwen-c" in error.message


@pytest.mark.parametrize("model", [None, 3, ["qwen"]])
def test_missing_or_non_string_model_is_400(names: Names, model: object) -> None:
    error = names.resolve(model)
    assert isinstance(error, RouteError)
    assert error.status == 400


def test_served_name_is_the_model_code_unless_the_file_names_one(names: Names) -> None:
    assert names.served["qwen"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert names.served["local"] == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/qwen/v1/models", "/qwen/v1/models"),
        ("/based/../other/v1/models", "/other/v1/models"),
        ("/a/./b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/../../v1/models", "/v1/models"),  # `..` stops at the root
        ("/a/.hidden/b", "/a/.hidden/b"),
    ],
)
def test_dot_segments_are_resolved_before_routing(path: str, normal: str) -> None:
    assert remove_dot_segments(path) == normal


@pytest.mark.parametrize(
    "path",
    [
        "/qwen/sleep",
        "/qwen/wake_up",
        "/qwen/is_sleeping",
        "/qwen/collective_rpc",
        "/qwen/reset_prefix_cache/",
        "/qwen//sleep",
        "/qwen/fault_tolerance/apply",
        "/qwen/update_weights",
        "/qwen/start_profile",
    ],
)
def test_engine_only_routes_are_refused_on_path_routes(names: Names, path: str) -> None:
    found = match(path, names)
    assert isinstance(found, RouteError), found
    assert found.status == 403 and found.code == "route_not_allowed"
    assert "POST /fleet/deployments/qwen/unload" in found.message


@pytest.mark.parametrize("path", ["/qwen/sleepy", "/qwen/v1/sleep", "/qwen/health"])
def test_paths_that_only_look_like_engine_only_routes_pass(names: Names, path: str) -> None:
    assert isinstance(match(path, names), Target)

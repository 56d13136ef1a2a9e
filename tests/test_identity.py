"""Identity resolution: tenant from keys or headers, session, priority, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefixroute.config import ConfigError
from prefixroute.drivers.identity import DEFAULT_TENANT_HEADERS, Identity, IdentityConfig
from prefixroute.request import RequestError


def test_defaults_take_the_first_tenant_header_present() -> None:
    cfg = IdentityConfig()
    assert cfg.tenant_headers == DEFAULT_TENANT_HEADERS
    headers = {"x-gateway-inference-fairness-id": "late", "x-llm-d-inference-fairness-id": "llmd"}
    assert cfg.resolve(headers, {}).tenant == "llmd"
    assert cfg.resolve({"x-tenant-id": " acme "}, {}).tenant == "acme"
    assert cfg.resolve({}, {}) == Identity("default", None, 0)


def test_the_body_is_not_trusted_for_tenants_unless_configured() -> None:
    body = {"user": "mallory"}
    assert IdentityConfig().resolve({}, body).tenant == "default"
    assert IdentityConfig(tenant_from_user=True).resolve({}, body).tenant == "mallory"
    # a header still wins over the body
    assert IdentityConfig(tenant_from_user=True).resolve({"x-tenant-id": "a"}, body).tenant == "a"


def test_session_from_header_then_prompt_cache_key() -> None:
    cfg = IdentityConfig()
    assert cfg.resolve({"x-session-id": "s1"}, {"prompt_cache_key": "k"}).session == "s1"
    assert cfg.resolve({}, {"prompt_cache_key": "k"}).session == "k"
    with pytest.raises(RequestError) as info:
        cfg.resolve({}, {"prompt_cache_key": 3})
    assert info.value.field == "prompt_cache_key"


def test_priority_integers_and_names() -> None:
    cfg = IdentityConfig(priorities={"critical": 1, "standard": 0, "sheddable": -1})
    assert cfg.resolve({"x-priority": "sheddable"}, {}).priority == -1
    assert cfg.resolve({"x-priority": "-7"}, {}).priority == -7
    assert cfg.resolve({"x-priority": " "}, {}).priority == 0
    for bad in ("urgent", "1.5", "99999999999"):
        with pytest.raises(RequestError) as info:
            cfg.resolve({"x-priority": bad}, {})
        assert info.value.status == 400
        assert info.value.field == "x-priority"


def test_api_keys_name_the_tenant_and_override_headers() -> None:
    cfg = IdentityConfig(api_keys={"sk-a": "alpha"})
    auth = {"authorization": "Bearer sk-a", "x-tenant-id": "someone-else"}
    assert cfg.resolve(auth, {}).tenant == "alpha"
    # not required: an unknown key falls back to the headers
    assert cfg.resolve({"authorization": "Bearer nope", "x-tenant-id": "t"}, {}).tenant == "t"
    assert "sk-a" not in repr(cfg) and "sk-a" not in cfg.api_keys


def test_require_api_key_answers_401() -> None:
    cfg = IdentityConfig(api_keys={"sk-a": "alpha"}, require_api_key=True)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic sk-a"}):
        with pytest.raises(RequestError) as info:
            cfg.resolve(headers, {})
        assert info.value.status == 401
        assert info.value.field == "authorization"
    with pytest.raises(ValueError, match="require_api_key"):
        IdentityConfig(require_api_key=True)


def test_ids_are_checked() -> None:
    with pytest.raises(RequestError) as info:
        IdentityConfig().resolve({"x-tenant-id": "x" * 300}, {})
    assert info.value.field == "x-tenant-id"
    with pytest.raises(RequestError):
        IdentityConfig().resolve({"x-session-id": "a\x00b"}, {})


def test_from_document(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("sk-file: beta\n", encoding="utf-8")
    doc = {
        "identity": {
            "tenant_headers": ["X-Org"],
            "api_keys": {"sk-a": "alpha"},
            "api_keys_file": "keys.yaml",
            "require_api_key": True,
            "priorities": {"low": -1},
        }
    }
    cfg = IdentityConfig.from_document(doc, base_dir=tmp_path)
    assert cfg.tenant_headers == ("x-org",)
    assert cfg.resolve({"authorization": "Bearer sk-file"}, {}).tenant == "beta"
    assert cfg.resolve({"authorization": "bearer sk-a", "x-priority": "low"}, {}) == Identity(
        "alpha", None, -1
    )
    assert IdentityConfig.from_document({}) == IdentityConfig()


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"tenant_header": "x"}, "identity.tenant_header"),
        ({"require_api_key": "yes"}, "identity.require_api_key"),
        ({"priorities": {"low": "minus one"}}, "identity.priorities.low"),
        ({"api_keys": {"k": 3}}, "identity.api_keys"),
        ({"require_api_key": True}, "identity.require_api_key"),
        ({"api_keys_file": "missing.yaml"}, ""),
    ],
)
def test_bad_sections_name_the_field(section: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        IdentityConfig.from_document({"identity": section}, base_dir="/nonexistent")
    assert info.value.path == path

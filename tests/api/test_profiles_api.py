"""Profiles, schemas, keys, audit and OpenAPI through HTTP."""

from __future__ import annotations

from tests.api.conftest import Api


def test_openapi_is_published(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    for path in (
        "/v1/batch",
        "/v1/track",
        "/v1/identify",
        "/v1/profiles/{namespace}/{value}",
        "/v1/privacy/delete",
        "/v1/schema",
    ):
        assert path in spec["paths"]


def test_schema_versions_and_validation_on_patch(api: Api) -> None:
    doc = {
        "attributes": {
            "plan": {"type": "string", "enum": ["free", "pro"]},
            "ltv": {"type": "number"},
        }
    }
    r = api.client.put("/v1/schema", json=doc, headers=api.bearer())
    assert r.status_code == 200 and r.json()["version"] == 1
    bad = api.client.put(
        "/v1/schema", json={"attributes": {"x": {"type": "strng"}}}, headers=api.bearer()
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["errors"][0]["path"] == "attributes.x.type"
    narrower = {"attributes": {"plan": {"type": "string", "enum": ["pro"]}}}
    r = api.client.put("/v1/schema", json=narrower, headers=api.bearer())
    assert r.json()["version"] == 2 and r.json()["warnings"]
    versions = api.client.get("/v1/schema/versions", headers=api.bearer()).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2]

    r = api.client.patch(
        "/v1/profiles/email/new@x.io?create=true",
        headers=api.bearer(),
        json={"attributes": {"plan": "pro"}},
    )
    assert r.status_code == 200, r.text
    r = api.client.patch(
        "/v1/profiles/email/new@x.io", headers=api.bearer(), json={"attributes": {"plan": "gold"}}
    )
    assert r.status_code == 400
    assert r.json()["error"]["errors"][0]["path"] == "attributes.plan"
    r = api.client.patch(
        "/v1/profiles/email/nobody@x.io", headers=api.bearer(), json={"attributes": {"plan": "pro"}}
    )
    assert r.status_code == 404


def test_search_and_lookup_by_any_identity(api: Api) -> None:
    api.client.post(
        "/v1/batch",
        headers=api.basic(),
        json={
            "batch": [
                {
                    "type": "identify",
                    "userId": f"u{i}",
                    "messageId": f"m{i}",
                    "traits": {
                        "email": f"p{i}@x.io",
                        "country": "DE" if i % 2 else "FR",
                        "ltv": i * 10,
                    },
                }
                for i in range(6)
            ]
        },
    )
    r = api.client.get("/v1/profiles?q=country=DE&q=ltv>20", headers=api.bearer())
    assert r.status_code == 200
    found = sorted(p["attributes"]["ltv"] for p in r.json()["profiles"])
    assert found == [30, 50]
    a = api.client.get("/v1/profiles/email/P3@X.io", headers=api.bearer()).json()
    b = api.client.get("/v1/profiles/user_id/u3", headers=api.bearer()).json()
    assert a["id"] == b["id"]
    r = api.client.get("/v1/profiles?q=ltv>abc", headers=api.bearer())
    assert r.status_code == 400 and "number" in r.text


def test_keys_users_and_audit(api: Api) -> None:
    r = api.client.post("/v1/keys", headers=api.bearer(), json={"scopes": ["read"], "name": "bi"})
    assert r.status_code == 201
    reader = r.json()["key"]
    assert api.client.get("/v1/schema", headers=api.bearer(reader)).status_code == 200
    assert api.client.put("/v1/schema", json={}, headers=api.bearer(reader)).status_code == 403
    assert api.client.delete(f"/v1/keys/{r.json()['id']}", headers=api.bearer()).status_code == 204
    assert api.client.get("/v1/schema", headers=api.bearer(reader)).status_code == 401
    u = api.client.post(
        "/v1/users", headers=api.bearer(), json={"email": "m@shop.io", "role": "marketer"}
    )
    assert u.status_code == 201
    token = u.json()["token"]
    assert (
        api.client.patch(
            "/v1/profiles/email/z@x.io?create=true",
            headers=api.bearer(token),
            json={"attributes": {"a": 1}},
        ).status_code
        == 200
    )
    entries = api.client.get("/v1/audit", headers=api.bearer()).json()["entries"]
    actions = {e["action"] for e in entries}
    assert {"key.create", "key.revoke", "user.create", "profile.update"} <= actions
    assert any(e["actor"].startswith("user:") for e in entries if e["action"] == "profile.update")

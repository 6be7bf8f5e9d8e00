"""Tests of workspace schemas: the JSON form, validation with coercion, compatibility."""

from __future__ import annotations

import json
import math
import pickle
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waymark.core.errors import InvalidInput, Issue
from waymark.model.schemas import (
    EVENT_NAME_PATTERN,
    NAME_PATTERN,
    EventSpec,
    FieldSpec,
    FieldType,
    Schema,
    StringFormat,
    UnknownPolicy,
    ValidationResult,
    diff_compatible,
    parse_schema,
    validate_attributes,
    validate_event,
)

DOCUMENT: dict[str, Any] = {
    "attributes": {
        "email": {"type": "string", "format": "email", "pii": True},
        "phone": {"type": "string", "format": "phone"},
        "country": {"type": "string", "format": "country"},
        "timezone": {"type": "string", "format": "timezone"},
        "plan": {"type": "string", "enum": ["free", "pro"]},
        "lifetime_value": {"type": "number"},
        "orders": {"type": "integer"},
        "vip": {"type": "boolean"},
        "signup_at": {"type": "timestamp"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "required": True}},
        },
        "user_id": {"type": "string", "required": True},
        "extra": {"type": "object"},
        "anything": {"type": "array"},
    },
    "events": {
        "purchase": {
            "properties": {
                "order_id": {"type": "string", "required": True},
                "revenue": {"type": "number"},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    },
                },
            }
        },
        "product_view": {"properties": {}},
    },
}

SCHEMA = parse_schema(DOCUMENT)


def strict(schema: Schema = SCHEMA, **policies: str) -> Schema:
    """The schema with some policies set to the given values."""
    return parse_schema({**schema.to_json(), **policies})


def attrs(data: dict[str, Any], **options: Any) -> ValidationResult:
    return validate_attributes(SCHEMA, data, **options)


def only_issue(result: ValidationResult) -> Issue:
    assert len(result.issues) == 1, result.issues
    return result.issues[0]


# --- the JSON form ---------------------------------------------------------------------------


def test_parse_reads_every_key() -> None:
    address = SCHEMA.attributes["address"]
    assert address.type is FieldType.OBJECT
    assert address.properties is not None
    assert address.properties["zip"] == FieldSpec(FieldType.STRING, required=True)
    assert SCHEMA.attributes["email"] == FieldSpec(
        FieldType.STRING, format=StringFormat.EMAIL, pii=True
    )
    assert SCHEMA.attributes["plan"].enum == ("free", "pro")
    assert SCHEMA.attributes["tags"].items == FieldSpec(FieldType.STRING)
    assert SCHEMA.attributes["extra"].properties is None
    assert SCHEMA.events["product_view"] == EventSpec()
    assert SCHEMA.unknown_attributes is UnknownPolicy.ACCEPT


def test_empty_schema_and_defaults() -> None:
    assert parse_schema({}) == Schema.empty()
    assert Schema.empty().to_json() == {
        "attributes": {},
        "events": {},
        "unknown_attributes": "accept",
        "unknown_events": "accept",
        "unknown_properties": "accept",
    }


def test_to_json_round_trips_the_document() -> None:
    assert parse_schema(SCHEMA.to_json()) == SCHEMA
    assert SCHEMA.to_json()["attributes"]["address"] == DOCUMENT["attributes"]["address"]
    assert json.loads(json.dumps(SCHEMA.to_json())) == SCHEMA.to_json()


def test_version_key_is_ignored() -> None:
    assert parse_schema({"version": 3}) == Schema.empty()


def test_python_constructors_accept_plain_strings() -> None:
    spec = FieldSpec("string", format="email", enum=["a@b.co"])  # type: ignore[arg-type]
    assert spec.type is FieldType.STRING
    assert spec.format is StringFormat.EMAIL
    assert spec.enum == ("a@b.co",)
    assert Schema(unknown_events="reject").unknown_events is UnknownPolicy.REJECT  # type: ignore[arg-type]


def test_enum_values_are_normalized_and_integral_floats_accepted() -> None:
    schema = parse_schema(
        {
            "attributes": {
                "c": {"type": "string", "format": "country", "enum": ["fra", "us"]},
                "n": {"type": "integer", "enum": [1, 2.0]},
            }
        }
    )
    assert schema.attributes["c"].enum == ("FR", "US")
    assert schema.attributes["n"].enum == (1, 2)
    assert validate_attributes(schema, {"c": "FRA"}).value == {"c": "FR"}


def field_doc(**spec: Any) -> dict[str, Any]:
    return {"attributes": {"f": spec}}


BAD_DOCUMENTS: list[tuple[object, str, str]] = [
    ([], "", "expected object (a schema), got array"),
    ({"bogus": 1}, "bogus", "unknown key 'bogus'; expected one of attributes"),
    ({"attributes": []}, "attributes", "expected object, got array"),
    ({"events": "x"}, "events", 'expected object, got string "x"'),
    ({"unknown_events": "drop"}, "unknown_events", 'expected "accept" or "reject", got string'),
    ({"unknown_attributes": True}, "unknown_attributes", "got boolean true"),
    ({"attributes": {"first name": {"type": "string"}}}, "attributes.first name", "invalid name"),
    ({"attributes": {"1st": {"type": "string"}}}, "attributes.1st", "invalid name '1st'"),
    ({"attributes": {"a" * 129: {"type": "string"}}}, "attributes." + "a" * 129, "invalid name"),
    ({"attributes": {"f": "string"}}, "attributes.f", "expected object (a field spec)"),
    (field_doc(), "attributes.f.type", "type is required"),
    (field_doc(type="strng"), "attributes.f.type", "unknown type 'strng'; expected one of string"),
    (field_doc(type=1), "attributes.f.type", "unknown type integer 1"),
    (
        {"attributes": {"address": {"type": "object", "properties": {"zip": {"type": "strng"}}}}},
        "attributes.address.properties.zip.type",
        "unknown type 'strng'; expected one of string, number, integer, boolean, timestamp",
    ),
    (field_doc(type="string", colour="red"), "attributes.f.colour", "unknown key 'colour'"),
    (field_doc(type="integer", format="email"), "attributes.f.format", "only allowed on type"),
    (field_doc(type="string", format="url"), "attributes.f.format", "unknown format 'url'"),
    (field_doc(type="string", items={"type": "string"}), "attributes.f.items", "type array"),
    (field_doc(type="array", properties={}), "attributes.f.properties", "type object"),
    (field_doc(type="string", required="yes"), "attributes.f.required", "expected boolean"),
    (field_doc(type="string", pii=1), "attributes.f.pii", "expected boolean, got integer 1"),
    (field_doc(type="string", description=2), "attributes.f.description", "expected string"),
    (field_doc(type="integer", enum=[1, "2"]), "attributes.f.enum[1]", "expected integer"),
    (field_doc(type="integer", enum=[1, 1.5]), "attributes.f.enum[1]", "got number 1.5"),
    (field_doc(type="integer", enum=[True]), "attributes.f.enum[0]", "got boolean true"),
    (field_doc(type="number", enum=[1, 1.0]), "attributes.f.enum[1]", "duplicate enum value"),
    (field_doc(type="number", enum=[math.nan]), "attributes.f.enum[0]", "got number NaN"),
    (field_doc(type="string", enum=[]), "attributes.f.enum", "non-empty array"),
    (field_doc(type="string", enum="a"), "attributes.f.enum", "non-empty array"),
    (field_doc(type="boolean", enum=[True]), "attributes.f.enum", "enum is only allowed on"),
    (
        field_doc(type="string", format="country", enum=["Narnia"]),
        "attributes.f.enum[0]",
        "expected ISO 3166-1",
    ),
    (
        field_doc(type="array", items={"type": "string", "required": True}),
        "attributes.f.items.required",
        "required is not allowed on array items",
    ),
    (
        field_doc(type="array", items={"type": "array", "items": {"type": "bogus"}}),
        "attributes.f.items.items.type",
        "unknown type 'bogus'",
    ),
    ({"events": {"bad!": {}}}, "events.bad!", "invalid event name 'bad!'"),
    ({"events": {"e": []}}, "events.e", "expected object (an event spec), got array"),
    ({"events": {"e": {"props": {}}}}, "events.e.props", "unknown key 'props'"),
    (
        {"events": {"e": {"properties": {"x": {"type": "number", "format": "phone"}}}}},
        "events.e.properties.x.format",
        "format is only allowed on type string, not number",
    ),
]


@pytest.mark.parametrize(("document", "path", "fragment"), BAD_DOCUMENTS)
def test_bad_documents_name_the_path(document: object, path: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_schema(document)
    issues = caught.value.issues
    assert [issue.path for issue in issues] == [path], issues
    assert fragment in issues[0].reason


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_schema(
            {
                "attributes": {"a": {"type": "strng"}, "b": {"type": "string", "enum": [1]}},
                "events": {"e": {"properties": {"c": {}}}},
                "unknown_properties": "maybe",
            }
        )
    assert [issue.path for issue in caught.value.issues] == [
        "attributes.a.type",
        "attributes.b.enum[0]",
        "events.e.properties.c.type",
        "unknown_properties",
    ]


def test_deep_nesting_is_refused() -> None:
    spec: dict[str, Any] = {"type": "string"}
    for _ in range(20):
        spec = {"type": "array", "items": spec}
    with pytest.raises(InvalidInput) as caught:
        parse_schema({"attributes": {"deep": spec}})
    (issue,) = caught.value.issues
    assert issue.path == "attributes.deep" + ".items" * 16
    assert "nested deeper than 16 levels" in issue.reason


# Hypothesis: the JSON form round-trips.

names = st.from_regex(NAME_PATTERN, fullmatch=True)
event_names = st.from_regex(EVENT_NAME_PATTERN, fullmatch=True)
texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
descriptions = st.none() | texts
finite = st.floats(allow_nan=False, allow_infinity=False)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def scalar_specs(draw: st.DrawFn, *, in_items: bool = False) -> FieldSpec:
    type_ = draw(st.sampled_from([t for t in FieldType if t not in ("object", "array")]))
    format_ = None
    enum: tuple[Any, ...] | None = None
    if type_ is FieldType.STRING:
        format_ = draw(st.none() | st.sampled_from(StringFormat))
        if format_ is None:
            enum = draw(st.none() | st.lists(texts, min_size=1, max_size=4, unique=True).map(tuple))
        elif format_ is StringFormat.COUNTRY:
            enum = draw(st.none() | st.just(("FR", "US")))
    elif type_ is FieldType.INTEGER:
        enum = draw(st.none() | st.lists(int64, min_size=1, max_size=4, unique=True).map(tuple))
    elif type_ is FieldType.NUMBER:
        values = st.lists(int64 | finite, min_size=1, max_size=4, unique=True)
        enum = draw(st.none() | values.map(tuple))
    return FieldSpec(
        type_,
        format=format_,
        enum=enum,
        required=False if in_items else draw(st.booleans()),
        description=draw(descriptions),
        pii=draw(st.booleans()),
    )


def field_specs(depth: int = 3, *, in_items: bool = False) -> st.SearchStrategy[FieldSpec]:
    options = [scalar_specs(in_items=in_items)]
    if depth > 0:
        required = st.just(False) if in_items else st.booleans()
        options.append(
            st.builds(
                FieldSpec,
                type=st.just(FieldType.ARRAY),
                items=st.none() | field_specs(depth - 1, in_items=True),
                required=required,
                description=descriptions,
            )
        )
        options.append(
            st.builds(
                FieldSpec,
                type=st.just(FieldType.OBJECT),
                properties=st.none() | st.dictionaries(names, field_specs(depth - 1), max_size=3),
                required=required,
                pii=st.booleans(),
            )
        )
    return st.one_of(options)


policies = st.sampled_from(UnknownPolicy)
schemas = st.builds(
    Schema,
    attributes=st.dictionaries(names, field_specs(), max_size=4),
    events=st.dictionaries(
        event_names,
        st.builds(
            EventSpec,
            properties=st.dictionaries(names, field_specs(), max_size=3),
            description=descriptions,
        ),
        max_size=3,
    ),
    unknown_attributes=policies,
    unknown_events=policies,
    unknown_properties=policies,
)


@given(schemas)
def test_to_json_round_trip_is_lossless(schema: Schema) -> None:
    document = schema.to_json()
    assert parse_schema(document) == schema
    assert parse_schema(json.loads(json.dumps(document))) == schema
    assert diff_compatible(schema, schema) == []


# --- validation: types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "given_value", "expected"),
    [
        ("plan", "pro", "pro"),
        ("lifetime_value", 12.5, 12.5),
        ("lifetime_value", 12, 12),
        ("lifetime_value", 2**70, float(2**70)),
        ("orders", 3, 3),
        ("orders", 3.0, 3),
        ("orders", -(2**63), -(2**63)),
        ("vip", True, True),
        ("vip", False, False),
        ("tags", ["a", "b"], ["a", "b"]),
        ("tags", [], []),
        ("anything", [1, "x", None], [1, "x", None]),
        ("extra", {"k": [1]}, {"k": [1]}),
        ("address", {"zip": "75001", "city": "Paris"}, {"zip": "75001", "city": "Paris"}),
    ],
)
def test_good_values_pass(name: str, given_value: Any, expected: Any) -> None:
    result = attrs({name: given_value})
    assert result.ok, result.issues
    assert result.value == {name: expected}
    assert type(result.value[name]) is type(expected)
    assert result.flags == ()


@pytest.mark.parametrize(
    ("name", "given_value", "reason"),
    [
        ("user_id", 12, "expected string, got integer 12"),
        ("user_id", ["a"], "expected string, got array"),
        ("lifetime_value", "12.5", 'expected number, got string "12.5"'),
        ("lifetime_value", True, "expected number, got boolean true"),
        ("lifetime_value", math.nan, "expected finite number, got number NaN"),
        ("lifetime_value", math.inf, "expected finite number, got number Infinity"),
        ("lifetime_value", -math.inf, "got number -Infinity"),
        ("lifetime_value", 10**400, "expected finite number, got integer with more than"),
        ("orders", "abc", 'expected integer, got string "abc"'),
        ("orders", "3", 'expected integer, got string "3"'),
        ("orders", 3.5, "expected integer, got number 3.5"),
        ("orders", True, "expected integer, got boolean true"),
        ("orders", math.nan, "expected integer, got number NaN"),
        ("orders", 2**63, "expected integer within the 64-bit range"),
        ("vip", 1, "expected boolean, got integer 1"),
        ("vip", "true", 'expected boolean, got string "true"'),
        ("signup_at", "yesterday", "expected timestamp (ISO-8601 or epoch seconds), got string"),
        ("signup_at", True, "expected timestamp (ISO-8601 or epoch seconds), got boolean true"),
        ("signup_at", 1e20, "in range, got number 1e+20"),
        ("signup_at", math.nan, "got number NaN"),
        ("tags", "a,b", 'expected array, got string "a,b"'),
        ("address", "Paris", 'expected object, got string "Paris"'),
        ("plan", "gold", 'expected one of ["free", "pro"], got string "gold"'),
        ("plan", 1, "expected string, got integer 1"),
    ],
)
def test_bad_values_are_issues(name: str, given_value: Any, reason: str) -> None:
    result = attrs({name: given_value})
    issue = only_issue(result)
    assert issue.path == f"traits.{name}"
    assert issue.code == "invalid"
    assert reason in issue.reason
    assert name not in result.value
    assert not result.ok


def test_long_values_are_shortened_in_reasons() -> None:
    issue = only_issue(attrs({"orders": "x" * 100}))
    assert issue.reason == 'expected integer, got string "' + "x" * 40 + '…"'


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [
        ("2024-03-01T10:00:00Z", datetime(2024, 3, 1, 10, tzinfo=UTC)),
        ("2024-03-01T12:00:00+02:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),
        ("2024-03-01 10:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),  # naive is UTC
        (" 2024-03-01 ", datetime(2024, 3, 1, tzinfo=UTC)),
        (1_700_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (1_700_000_000.5, datetime(2023, 11, 14, 22, 13, 20, 500_000, tzinfo=UTC)),
        (
            datetime(2024, 3, 1, 11, tzinfo=timezone(timedelta(hours=1))),
            datetime(2024, 3, 1, 10, tzinfo=UTC),
        ),
    ],
)
def test_timestamps_become_aware_utc(given_value: Any, expected: datetime) -> None:
    value = attrs({"signup_at": given_value}).value["signup_at"]
    assert value == expected
    assert value.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "  spaced  ",
        "",
        "émoji 🎉👩‍👩‍👧",
        "\u200b zero width",
        "עברית",
        "\ufeffbom",
        "a\nb",
    ],
)
def test_odd_unicode_strings_are_kept_as_is(text: str) -> None:
    assert attrs({"user_id": text}).value == {"user_id": text}


@pytest.mark.parametrize(
    ("text", "reason"),
    [("a\x00b", "without NUL characters"), ("a\ud800b", "string of valid Unicode")],
)
def test_strings_that_no_store_can_hold_are_issues(text: str, reason: str) -> None:
    issue = only_issue(attrs({"user_id": text}))
    assert issue.path == "traits.user_id"
    assert reason in issue.reason


# --- validation: formats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "given_value", "expected"),
    [
        ("email", "  Ada.Lovelace@Example.COM ", "Ada.Lovelace@example.com"),
        ("email", "ünï@exämple.com", "ünï@exämple.com"),
        ("phone", "+1 650-253-0000", "+16502530000"),
        ("phone", " +33 6 12 34 56 78", "+33612345678"),
        ("country", "fr", "FR"),
        ("country", "FRA", "FR"),
        ("country", "deu", "DE"),
        ("timezone", "Europe/Paris", "Europe/Paris"),
        ("timezone", "america/new_york", "America/New_York"),
        ("timezone", "UTC", "UTC"),
    ],
)
def test_formats_normalize(name: str, given_value: str, expected: str) -> None:
    result = attrs({name: given_value})
    assert result.ok, result.issues
    assert result.value == {name: expected}


@pytest.mark.parametrize(
    ("name", "given_value", "reason"),
    [
        ("email", "not-an-email", "expected email address, got string"),
        ("email", "a@localhost", "expected email address"),
        ("email", 5, "expected string, got integer 5"),
        ("phone", "06 12 34 56 78", "E.164 form, starting with + and country code"),
        ("phone", "+1 555 555 5555", "expected valid phone number in E.164 form"),
        ("phone", "+", "expected valid phone number"),
        ("country", "Germany", "expected ISO 3166-1 alpha-2 or alpha-3 country code"),
        ("country", "XX", 'country code, got string "XX"'),
        ("timezone", "Mars/Olympus_Mons", "expected IANA time zone name"),
        ("timezone", "+02:00", "expected IANA time zone name"),
    ],
)
def test_bad_formats_are_issues(name: str, given_value: Any, reason: str) -> None:
    issue = only_issue(attrs({name: given_value}))
    assert issue.path == f"traits.{name}"
    assert reason in issue.reason


# --- validation: null, required, nesting -----------------------------------------------------


def test_none_unsets_optional_attributes() -> None:
    result = attrs({"orders": None, "address": None, "email": None})
    assert result.ok
    assert result.value == {"orders": None, "address": None, "email": None}


def test_required_attributes_are_checked_only_when_not_partial() -> None:
    assert attrs({"orders": 1}).ok
    issue = only_issue(attrs({"orders": 1}, partial=False))
    assert issue == Issue("traits.user_id", 'required attribute "user_id" is missing', "required")
    assert attrs({"user_id": "u1"}, partial=False).ok


def test_required_attribute_cannot_be_unset() -> None:
    issue = only_issue(attrs({"user_id": None}))
    assert issue.path == "traits.user_id"
    assert issue.code == "required"
    assert "cannot be null" in issue.reason


def test_required_sub_field_is_always_checked() -> None:
    issue = only_issue(attrs({"address": {"city": "Paris"}}))
    assert issue.path == "traits.address.zip"
    assert issue.code == "required"
    assert "address" not in attrs({"address": {"city": "Paris"}}).value


def test_array_element_paths() -> None:
    result = attrs({"tags": ["a", 2, "c", None]})
    assert [(i.path, i.reason) for i in result.issues] == [
        ("traits.tags[1]", "expected string, got integer 2"),
        ("traits.tags[3]", "expected string, got null"),
    ]
    assert "tags" not in result.value


def test_custom_path() -> None:
    issue = only_issue(validate_attributes(SCHEMA, {"orders": "x"}, path="batch[3].traits"))
    assert issue.path == "batch[3].traits.orders"
    issue = only_issue(validate_attributes(SCHEMA, {"orders": "x"}, path=""))
    assert issue.path == "orders"


def test_input_that_is_not_an_object() -> None:
    issue = only_issue(validate_attributes(SCHEMA, ["x"]))  # type: ignore[arg-type]
    assert issue == Issue("traits", "expected object, got array")
    issue = only_issue(validate_event(SCHEMA, "purchase", "x"))  # type: ignore[arg-type]
    assert issue == Issue("properties", 'expected object, got string "x"')


def test_good_fields_are_kept_when_others_fail() -> None:
    result = attrs({"orders": "x", "vip": True, "country": "fr"})
    assert result.value == {"vip": True, "country": "FR"}
    assert [i.path for i in result.issues] == ["traits.orders"]


# --- unknown policies ------------------------------------------------------------------------


def test_unknown_attributes_accepted_and_flagged() -> None:
    result = attrs({"foo": {"any": 1}, "address": {"zip": "1", "floor": 3}})
    assert result.ok
    assert result.value == {"foo": {"any": 1}, "address": {"zip": "1", "floor": 3}}
    assert result.flags == ("unknown_attribute:foo", "unknown_attribute:address.floor")


def test_unknown_attributes_rejected() -> None:
    schema = strict(unknown_attributes="reject")
    result = validate_attributes(schema, {"foo": 1, "address": {"zip": "1", "floor": 3}})
    assert [(i.path, i.reason, i.code) for i in result.issues] == [
        ("traits.foo", 'unknown attribute "foo"', "unknown"),
        ("traits.address.floor", 'unknown attribute "floor"', "unknown"),
    ]
    assert result.flags == ()


def test_unknown_events_accepted_and_flagged() -> None:
    result = validate_event(SCHEMA, "Signed Up", {"plan": "x", "n": math.nan})
    assert result.ok
    assert result.flags == ("unknown_event:Signed Up",)
    assert result.value["plan"] == "x"


def test_unknown_events_rejected() -> None:
    result = validate_event(strict(unknown_events="reject"), "Signed Up", {})
    assert result.issues == (Issue("event", 'unknown event type "Signed Up"', "unknown"),)


def test_unknown_properties_accepted_and_flagged() -> None:
    props = {"order_id": "o1", "coupon": "X", "items": [{"sku": "a", "colour": "red"}]}
    result = validate_event(SCHEMA, "purchase", props)
    assert result.ok
    assert result.value == props
    assert result.flags == ("unknown_property:coupon", "unknown_property:items[0].colour")


def test_unknown_properties_rejected() -> None:
    props = {"order_id": "o1", "coupon": "X", "items": [{"sku": "a", "colour": "red"}]}
    result = validate_event(strict(unknown_properties="reject"), "purchase", props)
    assert [(i.path, i.reason) for i in result.issues] == [
        ("properties.coupon", 'unknown property "coupon"'),
        ("properties.items[0].colour", 'unknown property "colour"'),
    ]


def test_declared_event_properties() -> None:
    props = {"order_id": "o1", "revenue": 10, "items": [{"sku": "a", "qty": 2.0}]}
    result = validate_event(SCHEMA, "purchase", props)
    assert result.ok
    assert result.value == {"order_id": "o1", "revenue": 10, "items": [{"sku": "a", "qty": 2}]}
    assert validate_event(SCHEMA, "product_view", {}).value == {}


def test_event_required_property_and_nested_paths() -> None:
    props = {"items": [{"sku": "a"}, {"sku": "b"}, {"sku": 7, "qty": "2"}]}
    result = validate_event(SCHEMA, "purchase", props)
    assert [(i.path, i.reason) for i in result.issues] == [
        ("properties.items[2].sku", "expected string, got integer 7"),
        ("properties.items[2].qty", 'expected integer, got string "2"'),
        ("properties.order_id", 'required property "order_id" is missing'),
    ]
    result = validate_event(SCHEMA, "purchase", {"order_id": None}, path="batch[0].properties")
    assert only_issue(result).path == "batch[0].properties.order_id"


# --- lenient coercion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("orders", "12", 12),
        ("orders", " -3 ", -3),
        ("orders", "4.0", 4),
        ("orders", "1e3", 1000),
        ("lifetime_value", "1.5", 1.5),
        ("lifetime_value", "7", 7),
        ("lifetime_value", ".5", 0.5),
        ("vip", "true", True),
        ("vip", "FALSE", False),
        ("vip", "1", True),
        ("vip", "0", False),
        ("vip", "Yes", True),
        ("vip", "no", False),
        ("signup_at", "1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("signup_at", "2024-03-01", datetime(2024, 3, 1, tzinfo=UTC)),
        ("tags", '["a", "b"]', ["a", "b"]),
        ("address", '{"zip": "1"}', {"zip": "1"}),
        ("country", "fra", "FR"),
        ("user_id", "42", "42"),
        ("orders", "", None),
        ("plan", "", None),
        ("orders", 5, 5),
    ],
)
def test_lenient_reads_text_as_the_declared_type(name: str, text: Any, expected: Any) -> None:
    result = attrs({name: text}, lenient=True)
    assert result.ok, result.issues
    assert result.value == {name: expected}
    assert type(result.value[name]) is type(expected)


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("orders", "12abc", 'expected integer, got string "12abc"'),
        ("orders", "1.5", 'expected integer, got string "1.5"'),
        ("orders", "1_000", 'expected integer, got string "1_000"'),
        ("orders", "١٢", "expected integer"),
        ("orders", "9" * 5000, "expected integer, got string"),
        ("orders", "9" * 30, "expected integer, got string"),
        ("lifetime_value", "nan", 'expected number, got string "nan"'),
        ("lifetime_value", "1e400", 'expected number, got string "1e400"'),
        ("vip", "maybe", 'expected boolean (true/false, 1/0, yes/no), got string "maybe"'),
        ("signup_at", "soon", "expected timestamp"),
        ("tags", "a,b", 'expected array, got string "a,b"'),
        ("tags", '{"a": 1}', "expected array"),
        ("tags", "[1]", "expected string, got integer 1"),
        ("address", "[]", 'expected object, got string "[]"'),
    ],
)
def test_lenient_names_the_field_it_cannot_read(name: str, text: str, reason: str) -> None:
    issue = only_issue(attrs({name: text}, lenient=True))
    assert issue.path.startswith(f"traits.{name}")
    assert reason in issue.reason


def test_lenient_empty_text_on_required_field() -> None:
    issue = only_issue(validate_event(SCHEMA, "purchase", {"order_id": ""}, lenient=True))
    assert issue.path == "properties.order_id"
    assert issue.code == "required"
    lenient = validate_event(SCHEMA, "purchase", {"order_id": "o1", "revenue": "2.5"}, lenient=True)
    assert lenient.value == {"order_id": "o1", "revenue": 2.5}


# --- the Schema object -----------------------------------------------------------------------


def test_compiled_cache_does_not_affect_equality_or_pickling() -> None:
    schema = parse_schema(DOCUMENT)
    validate_attributes(schema, {"orders": 1})
    validate_attributes(schema, {"orders": "1"}, lenient=True)
    assert schema == SCHEMA == parse_schema(DOCUMENT)
    copy = pickle.loads(pickle.dumps(schema))
    assert copy == schema
    assert validate_attributes(copy, {"orders": 2.0}).value == {"orders": 2}


def test_schema_copies_its_mappings() -> None:
    attributes = {"a": FieldSpec(FieldType.STRING)}
    schema = Schema(attributes=attributes)
    attributes["b"] = FieldSpec(FieldType.INTEGER)
    assert list(schema.attributes) == ["a"]


# --- compatibility ---------------------------------------------------------------------------


def changed(**attributes: dict[str, Any]) -> Schema:
    document = SCHEMA.to_json()
    document["attributes"].update(attributes)
    return parse_schema(document)


def test_diff_of_compatible_changes_is_empty() -> None:
    assert diff_compatible(SCHEMA, SCHEMA) == []
    widened = changed(orders={"type": "number"}, new={"type": "string"})
    assert diff_compatible(SCHEMA, widened) == []
    more_values = changed(plan={"type": "string", "enum": ["free", "pro", "team"]})
    assert diff_compatible(SCHEMA, more_values) == []
    relaxed = changed(user_id={"type": "string"})
    assert diff_compatible(SCHEMA, relaxed) == []
    document = SCHEMA.to_json()
    del document["attributes"]["vip"]
    assert diff_compatible(SCHEMA, parse_schema(document)) == []


def test_diff_reports_breaking_changes() -> None:
    new = changed(
        orders={"type": "string"},
        plan={"type": "string", "enum": ["free"]},
        vip={"type": "boolean", "required": True},
        lifetime_value={"type": "number", "enum": [0, 1]},
        user_id={"type": "string", "required": True, "format": "email"},
        address={
            "type": "object",
            "properties": {"city": {"type": "integer"}, "zip": {"type": "string"}},
        },
        extra={"type": "object", "properties": {}},
        tags={"type": "array", "items": {"type": "integer"}},
        anything={"type": "array", "items": {"type": "string"}},
        newcomer={"type": "string", "required": True},
    )
    assert diff_compatible(SCHEMA, new) == [
        'attributes.plan: enum values removed: ["pro"]',
        "attributes.lifetime_value: now restricted to [0, 1]",
        "attributes.orders: type changed from integer to string",
        "attributes.vip: became required",
        "attributes.tags.items: type changed from string to integer",
        "attributes.address.properties.city: type changed from string to integer",
        "attributes.user_id: format changed from none to email",
        "attributes.extra: object sub-fields are now checked",
        "attributes.anything.items: array elements are now checked",
        "attributes.newcomer: new required field",
    ]


def test_diff_reports_policies_and_removals_under_reject() -> None:
    old = SCHEMA
    document = old.to_json()
    del document["attributes"]["vip"]
    del document["events"]["product_view"]
    del document["events"]["purchase"]["properties"]["revenue"]
    document["events"]["signed_up"] = {"properties": {"plan": {"type": "string", "required": True}}}
    document.update(
        unknown_attributes="reject", unknown_events="reject", unknown_properties="reject"
    )
    assert diff_compatible(old, parse_schema(document)) == [
        "unknown_attributes: changed from accept to reject",
        "unknown_events: changed from accept to reject",
        "unknown_properties: changed from accept to reject",
        "attributes.vip: removed while undeclared fields are rejected",
        "events.purchase.properties.revenue: removed while undeclared fields are rejected",
        "events.product_view: event type removed while unknown events are rejected",
        "events.signed_up.properties.plan: new required field",
    ]

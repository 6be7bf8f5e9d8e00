"""Templates: parsing the document, checking it against the schema, rendering per recipient."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waymark.core.errors import InvalidInput
from waymark.delivery.templates import (
    Channel,
    RenderFailed,
    compile_template,
    parse_template,
)
from waymark.model.schemas import parse_schema

SCHEMA = parse_schema(
    {
        "attributes": {
            "first_name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}},
            "prefs": {"type": "object"},
            "points": {"type": "integer"},
        },
        "events": {"purchase": {"properties": {"revenue": {"type": "number"}}}},
    }
)


def issues(document: dict[str, Any], fragments: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(InvalidInput) as caught:
        compile_template(parse_template(document), SCHEMA, fragments)
    return [str(issue) for issue in caught.value.issues]


def test_an_email_renders_with_defaults_fragments_and_derived_text() -> None:
    template = compile_template(
        parse_template(
            {
                "channel": "email",
                "subject": 'Hi {{ profile.first_name | default: "there" }}',
                "preheader": "{{ profile.points }} points",
                "html": (
                    "<h1>Hello {{ profile.first_name }}</h1>"
                    "<p>From {{ profile.address.city }}</p>"
                    "{% render 'footer', link: message.unsubscribe_url %}"
                ),
            }
        ),
        SCHEMA,
        {"footer": "<p><a href='{{ link }}'>Unsubscribe</a></p>"},
    )
    ann = template.render(
        {
            "profile": {"first_name": "Ann <3", "points": 12, "address": {"city": "Köln"}},
            "message": {"unsubscribe_url": "https://x.test/u/1"},
        }
    )
    assert ann.channel is Channel.EMAIL
    assert ann.fields["subject"] == "Hi Ann <3"  # text fields are not escaped
    assert "<h1>Hello Ann &lt;3</h1>" in ann.fields["html"]  # html is
    assert "href='https://x.test/u/1'" in ann.fields["html"]
    assert ann.fields["text"].splitlines()[0] == "Hello Ann <3"
    assert "From Köln" in ann.fields["text"]
    nobody = template.render({"profile": {}, "message": {}})
    assert nobody.fields["subject"] == "Hi there"
    assert nobody.fields["preheader"] == " points"
    assert template.references == {
        "profile.first_name",
        "profile.points",
        "profile.address.city",
        "message.unsubscribe_url",
    }


def test_a_given_text_part_is_kept_and_safe_marks_trusted_markup() -> None:
    template = compile_template(
        parse_template(
            {
                "channel": "email",
                "subject": "s",
                "html": "{{ offer.content.banner | safe }}",
                "text": "Plain {{ profile.first_name }}",
            }
        ),
        SCHEMA,
    )
    out = template.render(
        {"profile": {"first_name": "Bo"}, "offer": {"content": {"banner": "<b>x</b>"}}}
    )
    assert out.fields == {"subject": "s", "html": "<b>x</b>", "text": "Plain Bo"}


def test_missing_skip_fails_the_render_for_that_recipient_and_names_the_value() -> None:
    template = compile_template(
        parse_template(
            {
                "channel": "sms",
                "text": "{{ profile.first_name }}, {{ profile.points | default: 0 }} points",
                "missing": "skip",
            }
        ),
        SCHEMA,
    )
    assert template.render({"profile": {"first_name": "Cy"}}).fields["text"] == "Cy, 0 points"
    with pytest.raises(RenderFailed) as caught:
        template.render({"profile": {}})
    assert caught.value.field == "text"
    assert "profile.first_name" in caught.value.reason


def test_a_filter_failing_on_the_data_is_a_render_failure() -> None:
    template = compile_template(
        parse_template({"channel": "sms", "text": "{{ profile.points | divided_by: 0 }}"}), SCHEMA
    )
    with pytest.raises(RenderFailed) as caught:
        template.render({"profile": {"points": 3}})
    assert caught.value.field == "text"
    assert "divided" in caught.value.reason or "zero" in caught.value.reason


def test_a_webhook_body_must_render_to_json() -> None:
    template = compile_template(
        parse_template(
            {
                "channel": "webhook",
                "url": " https://hooks.test/{{ profile.first_name | url_encode }} ",
                "body": '{"name": {{ profile.first_name | json }}, "n": 1}',
            }
        ),
        SCHEMA,
    )
    out = template.render({"profile": {"first_name": 'Di "D"'}})
    assert out.json == {"name": 'Di "D"', "n": 1}
    assert out.fields["url"] == "https://hooks.test/Di+%22D%22"
    with pytest.raises(RenderFailed, match="not an http"):
        compile_template(
            parse_template({"channel": "webhook", "url": "{{ profile.first_name }}", "body": "1"}),
            SCHEMA,
        ).render({"profile": {"first_name": "javascript:alert(1)"}})
    broken = compile_template(
        parse_template(
            {
                "channel": "webhook",
                "url": "https://h.test",
                "body": '{"name": {{ profile.first_name }}}',
            }
        ),
        SCHEMA,
    )
    with pytest.raises(RenderFailed, match="not JSON"):
        broken.render({"profile": {"first_name": "Ed"}})


def test_push_and_inbox_render_their_data_objects() -> None:
    push = compile_template(
        parse_template(
            {
                "channel": "push",
                "title": "{{ campaign.name }}",
                "body": "For {{ profile.first_name }}",
                "deep_link": "app://cart/{{ event.properties.cart_id }}",
                "data": {"sku": "{{ event.properties.sku }}"},
            }
        ),
        SCHEMA,
    )
    out = push.render(
        {
            "profile": {"first_name": "Flo"},
            "campaign": {"name": "Sale"},
            "event": {"properties": {"cart_id": "c9", "sku": "s1"}},
        }
    )
    assert out.fields == {"title": "Sale", "body": "For Flo", "deep_link": "app://cart/c9"}
    assert out.data == {"sku": "s1"}


def test_syntax_errors_give_the_field_line_and_column() -> None:
    found = issues({"channel": "email", "subject": "ok", "html": "line one\n  {% if %}"})
    assert found == ["html: missing expression (line 2, column 6)"]
    found = issues({"channel": "sms", "text": "a {{ profile.first_name "})
    assert found == ["text: expected '}}', found end of file (line 1, column 3)"]


def test_references_are_checked_against_the_roots_and_the_schema() -> None:
    found = issues(
        {
            "channel": "email",
            "subject": "{{ profil.first_name }}",
            "text": (
                "{{ profile.frist_name }}\n{{ profile.address.town }} {{ profile.tags.foo }}"
                " {{ profile.points.x }} {{ campaign.nmae }} {{ event.properties.revnue }}"
            ),
            "event_type": "purchase",
        }
    )
    assert (
        found[0]
        == "subject: unknown variable 'profil'; did you mean \"profile\"? (line 1, column 4)"
    )
    text = "\n".join(found[1:])
    assert "unknown attribute 'frist_name'" in text and 'did you mean "first_name"' in text
    assert "(line 1, column 4)" in found[1]
    assert "'profile.address' has no field 'town'" in text and "(line 2, column 4)" in text
    assert "'profile.tags' is an array" in text
    assert "'profile.points' is integer: it has no field 'x'" in text
    assert "campaign has no 'nmae'" in text
    assert "event type 'purchase' has no property 'revnue'" in text
    assert len(found) == 7


def test_free_form_places_and_locals_are_not_checked() -> None:
    compile_template(
        parse_template(
            {
                "channel": "sms",
                "text": (
                    "{% assign n = profile.first_name | upcase %}{{ n }}"
                    "{% for t in profile.tags %}{{ t }}{% endfor %}{{ profile.tags.first }}"
                    "{{ profile.prefs.anything.deep }}{{ journey.context.order.id }}"
                    "{{ event.properties.whatever }}{{ offer.content.x }}{{ profile.tags[0] }}"
                ),
            }
        ),
        SCHEMA,
    )


def test_unknown_filters_and_fragments_are_reported() -> None:
    found = issues({"channel": "sms", "text": "{{ profile.first_name | upcse }}"})
    assert found == ["text: unknown filter 'upcse' (line 1, column 25); did you mean \"upcase\"?"]
    found = issues({"channel": "sms", "text": "{% render 'nope' %}"})
    assert len(found) == 1 and "unknown fragment" in found[0] and "nope" in found[0]
    found = issues({"channel": "sms", "text": "{% render 'f' %}"}, {"f": "{{ profile.nope }}"})
    assert found == [
        "text: unknown attribute 'nope' in 'profile.nope'; known: "
        '"address", "first_name", "points", "prefs", "tags" (in fragment \'f\')'
    ]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("x", [": a template is a JSON object"]),
        (
            {"channel": "fax"},
            ["channel: unknown channel 'fax'; expected one of email, sms, push, webhook, inbox"],
        ),
        (
            {"channel": "sms", "txt": "a"},
            [
                'txt: not a field of an sms template; did you mean "text"?',
                "text: an sms template needs a non-empty text",
            ],
        ),
        (
            {"channel": "email", "subject": "s"},
            ["html: an email template needs html or text (or both)"],
        ),
        (
            {"channel": "email", "subject": 3, "text": "t"},
            [
                "subject: a template field is a string of Liquid source",
                "subject: an email template needs a non-empty subject",
            ],
        ),
        (
            {"channel": "push", "title": "t", "body": "b", "data": {"k": 1}},
            ["data.k: a string of Liquid source"],
        ),
        (
            {"channel": "sms", "text": "t", "missing": "maybe"},
            ['missing: either "empty" or "skip"'],
        ),
    ],
)
def test_bad_documents_name_each_problem(document: Any, expected: list[str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_template(document)
    assert [str(i).replace("<root>", "") for i in caught.value.issues] == expected


@given(
    st.sampled_from(["email", "sms", "push", "webhook", "inbox"]),
    st.sampled_from(["empty", "skip"]),
    st.text(max_size=20),
)
def test_the_json_form_reads_back_equal(channel: str, missing: str, text: str) -> None:
    document: dict[str, Any] = {"channel": channel, "missing": missing}
    if channel == "email":
        document.update(subject=text if text.strip() else "s", html="<p>h</p>")
    elif channel == "sms":
        document.update(text=text if text.strip() else "t")
    elif channel == "webhook":
        document.update(url="https://h.test/x", body="{}")
    else:
        document.update(title=text if text.strip() else "t", body="b", data={"k": text})
    definition = parse_template(document)
    assert parse_template(definition.to_json()) == definition


def _email(html: str, fragments: dict[str, str] | None = None) -> Any:
    return compile_template(
        parse_template({"channel": "email", "subject": "s", "html": html}), SCHEMA, fragments
    )


def test_the_derived_text_part_matches_converting_each_rendered_html() -> None:
    from inscriptis import get_text

    html = (
        "<html><head><style>p { color: red }</style></head><body>"
        "<h1>Hi {{ profile.first_name | default: 'there' }}</h1>"
        "<ul>{% for tag in profile.tags %}<li>{{ tag | upcase }}</li>{% endfor %}</ul>"
        "{% if profile.points > 10 %}<p>Gold: {{ profile.points }}</p>{% else %}<p>Soon</p>"
        "{% endif %}<p><a href='{{ message.unsubscribe_url }}'>Unsubscribe</a></p>"
        "{% render 'footer' %}</body></html>"
    )
    template = _email(html, {"footer": "<table><tr><td>Acme &amp; Co</td></tr></table>"})
    for profile in (
        {"first_name": "Ann", "tags": ["a", "b"], "points": 12},
        {"tags": [], "points": 3},
        {},
    ):
        out = template.render({"profile": profile, "message": {"unsubscribe_url": "u"}})
        assert out.fields["text"] == get_text(out.fields["html"]).strip() + "\n"
        assert "Acme & Co" in out.fields["text"] and "color" not in out.fields["text"]


def test_profile_values_in_the_derived_text_are_not_escaped() -> None:
    out = _email("<p>{{ profile.first_name }} &lt;3</p>").render(
        {"profile": {"first_name": "Tom & <Jerry>"}}
    )
    assert out.fields["html"] == "<p>Tom &amp; &lt;Jerry&gt; &lt;3</p>"
    assert out.fields["text"] == "Tom & <Jerry> <3\n"


def test_a_block_opened_inside_an_attribute_falls_back_to_converting_the_html() -> None:
    template = _email('<p class="{% if profile.points %}x">Points{% else %}y">None{% endif %}</p>')
    assert template.render({"profile": {"points": 1}}).fields["text"] == "Points\n"
    assert template.render({"profile": {}}).fields["text"] == "None\n"

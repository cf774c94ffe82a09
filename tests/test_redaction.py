from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.redaction import MASK, SENSITIVE_FIELDS, Redactor


def test_registered_secret_is_masked_everywhere_in_a_record() -> None:
    redactor = Redactor(["s3cret-value"])
    record = redactor(
        None,
        "info",
        {
            "event": "line with s3cret-value inside",
            "nested": {"list": ["x s3cret-value", 3]},
            "tuple": ("s3cret-value",),
        },
    )
    assert record == {
        "event": f"line with {MASK} inside",
        "nested": {"list": [f"x {MASK}", 3]},
        "tuple": (MASK,),
    }


def test_secret_registered_at_run_time_is_masked_from_then_on() -> None:
    redactor = Redactor()
    assert redactor.redact_text("token=runtime-secret") == "token=runtime-secret"
    redactor.register("runtime-secret")
    assert redactor.redact_text("token=runtime-secret") == f"token={MASK}"


def test_a_forgotten_secret_is_no_longer_masked_unless_another_registration_holds_it() -> None:
    redactor = Redactor(["sidecar-data-key"])  # the sidecar's own: never forgotten
    redactor.register("engine-start-key", "sidecar-data-key")  # an engine's: its key, and a value it shares
    redactor.register("engine-start-key")  # a second holder (a worker's view of the same engine)
    redactor.forget("engine-start-key", "sidecar-data-key")
    assert redactor.redact_text("engine-start-key sidecar-data-key") == f"{MASK} {MASK}"
    redactor.forget("engine-start-key")
    assert redactor.redact_text("engine-start-key sidecar-data-key") == f"engine-start-key {MASK}"
    redactor.forget("engine-start-key", "never-registered")  # once too often, or never held: nothing changes
    assert redactor.redact_text("engine-start-key never-registered sidecar-data-key") == (
        f"engine-start-key never-registered {MASK}"
    )
    redactor.register("engine-start-key")  # registered again after all its holders let it go: masked again
    assert redactor.redact_text("engine-start-key") == MASK


def test_longer_secret_containing_a_shorter_one_is_masked_whole() -> None:
    redactor = Redactor(["abcdef", "abcdefghij"])
    assert redactor.redact_text("x abcdefghij y") == f"x {MASK} y"


def test_token_shaped_strings_are_masked() -> None:
    redactor = Redactor()
    text = "HF_TOKEN=hf_AbCdEf123456 key sk-proj-abc_DEF-123456 and sk-short fine"
    assert redactor.redact_text(text) == f"HF_TOKEN={MASK} key {MASK} and sk-short fine"


def test_auth_header_values_written_as_text_are_masked() -> None:
    redactor = Redactor()
    assert redactor.redact_text("Authorization: Bearer opaque-thing") == f"Authorization: Bearer {MASK}"
    assert redactor.redact_text("{'x-api-key': 'opaque-thing'}") == f"{{'x-api-key': '{MASK}'}}"


def test_sensitive_field_names_are_masked_whatever_their_value() -> None:
    redactor = Redactor()
    record = redactor(None, "info", {"event": "e", "Authorization": "Bearer x", "headers": {"X-API-Key": "k"}})
    assert record == {"event": "e", "Authorization": MASK, "headers": {"X-API-Key": MASK}}


def test_short_values_are_not_masked_in_free_text() -> None:
    redactor = Redactor(["1", "true"])
    assert redactor.redact_text("pid=1 ready=true") == "pid=1 ready=true"


# Records made of what log lines hold (text, numbers, nested dicts and lists), with secrets, token-shaped strings
# and auth headers mixed into their text and keys.
_pieces = st.sampled_from(["s3cret-value", "hf_abcdefgh", "sk-abcdefgh", "Authorization: Bearer xyz", "X-API-KEY=q"])
_text = st.lists(st.one_of(_pieces, st.text(max_size=12)), max_size=4).map("".join)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _text)
_key = st.one_of(st.sampled_from(["token", "api_key", "Authorization", "ttft_ms", "path"]), st.text(max_size=8))
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_key, inner, max_size=3))


@given(st.dictionaries(_key, _value, max_size=6))
def test_clean_records_skip_the_walk_only_when_the_walk_would_change_nothing(record: dict[str, object]) -> None:
    redactor = Redactor(["s3cret-value"])
    walked = {
        key: MASK if key.lower() in SENSITIVE_FIELDS and value is not None else redactor.redact(value)
        for key, value in record.items()
    }
    assert redactor(None, "info", record) == walked

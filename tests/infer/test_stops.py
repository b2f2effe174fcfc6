"""Stop handling (infer.stops): an incremental detokenizer and stop matcher, linear in the output, shared by the
engine (pull) and the server's batcher (push)."""

from __future__ import annotations

import pydoc_data.topics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from matryoshka_lm.core.spec import uniform_spec
from matryoshka_lm.data import limit_chars, train_tokenizer
from matryoshka_lm.infer.sampling import GREEDY
from matryoshka_lm.infer.stops import StopRow, stream_rows
from matryoshka_lm.serve.batcher import GenRequest, RowStream, Ticket

MULTIBYTE = "naïve café — 日本語 🙂"


@pytest.fixture(scope="module")
def tok():
    """The real tokenizer of the tiny test checkpoints (tests/_tiny_ckpt.py): a 300-token byte-level BPE, so
    every character outside its corpus is split into byte tokens."""
    return train_tokenizer(limit_chars(list(pydoc_data.topics.topics.values()), 60_000), 300)


@pytest.fixture(scope="module")
def long_ids(tok) -> list[int]:
    ids = tok.encode(f"{MULTIBYTE}\n" + "\n".join(list(pydoc_data.topics.topics.values())[:3])).ids
    assert len(ids) >= 400
    return ids


# a toy byte-level vocabulary: whole and partial UTF-8 characters, an invalid byte, a token that decodes to
# nothing (like a skipped special token) and one mixing a letter with the start of a character
BYTES = [
    b"a",
    b"b",
    b"ab",
    b"ba",
    b"\xc3",
    b"\xa9",
    b"\xc3\xa9",
    b"\xe6\x97",
    b"\xa5",
    b"\xe6",
    b"",
    b"\xff",
    b"a\xc3",
    b"!",
]


def bytes_decode(ids: list[int]) -> str:
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def enc(*pieces: bytes) -> list[int]:
    return [BYTES.index(p) for p in pieces]


def reference(tokens: list[int], stop_tokens, stops, decode) -> tuple[list[int], str, str]:
    """The former quadratic implementation: decode everything after every token; at the first token whose text
    holds a stop string, cut before the earliest one and keep the longest token prefix whose text fits."""
    kept: list[int] = []
    for t in tokens:
        if t in stop_tokens:
            return kept, decode(kept), "stop"
        kept.append(t)
        text = decode(kept)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            text = text[: min(hits)]
            k = len(kept)
            while k > 0 and not text.startswith(decode(kept[:k])):
                k -= 1
            return kept[:k], text, "stop"
    return kept, decode(kept), "length"


def pull(tokens: list[int], stop_tokens, stops, decode) -> tuple[list[str], StopRow]:
    """Engine.stream's path: the pieces stream_rows yields, and the row."""
    row = StopRow(frozenset(stop_tokens), tuple(stops), decode)
    return list(stream_rows(([t] for t in tokens), row)), row


def push(tokens: list[int], stop_tokens, stops, decode) -> list:
    """The batcher's path: the events a row sends, its budget being the number of tokens (a RowStream never
    touches its request's ticket)."""
    req = GenRequest(
        Ticket(None),
        0,
        [1],
        uniform_spec(tiny_config(), "S"),
        len(tokens),
        GREEDY,
        frozenset(stop_tokens),
        tuple(stops),
    )
    row, events = RowStream(req, len(tokens), decode), []
    for t in tokens:
        ev = row.push(t)
        if ev is not None:
            events.append(ev)
        if row.done:
            break
    return events


class Counting:
    """A decode function that counts the tokens it was given."""

    def __init__(self, decode):
        self.decode, self.tokens = decode, 0

    def __call__(self, ids: list[int]) -> str:
        self.tokens += len(ids)
        return self.decode(ids)


# ---------------------------------------------------------------- linear in the output


@pytest.mark.parametrize("n", [200, 400])
def test_decoding_work_is_linear_in_the_output(tok, long_ids, n):
    ids, stops = long_ids[:n], ("NEVER", "zzz")
    generate, stream, serve = Counting(tok.decode), Counting(tok.decode), Counting(tok.decode)
    row = StopRow(frozenset(), stops, generate)  # Engine.generate's path
    for t in ids:
        row.add(t)
    assert row.completion().text == tok.decode(ids)
    pull(ids, (), stops, stream)
    push(ids, (), stops, serve)
    # re-decoding the whole output at every token was n²/2 tokens (20000 for n = 200)
    assert max(generate.tokens, stream.tokens, serve.tokens) <= 4 * n


def test_long_runs_of_unfinished_bytes_stay_bounded_and_exact():
    ids = enc(b"a", *[b"\xa5"] * 300, b"\xe6", b"\xa5", b"\xa5", b"b")  # stray bytes, then a character in three
    counting = Counting(bytes_decode)
    pieces, row = pull(ids, (), ("zz",), counting)
    assert "".join(pieces) == row.completion().text == bytes_decode(ids)
    assert counting.tokens <= 40 * len(ids)


# ---------------------------------------------------------------- the text


def test_streamed_pieces_join_to_the_one_shot_decode(tok, long_ids):
    ids = tok.encode(MULTIBYTE).ids
    assert len(ids) > len(MULTIBYTE)  # characters split across tokens
    for tokens in (ids, long_ids[:300]):
        pieces, row = pull(tokens, (), (), tok.decode)
        assert all(pieces) and "".join(pieces) == tok.decode(tokens) == row.completion().text
    pieces = pull(ids, (), (), tok.decode)[0]
    assert "".join(pieces) == MULTIBYTE and not any("\ufffd" in p for p in pieces)  # no half characters sent


def test_a_stop_inside_multibyte_text_cuts_text_and_tokens(tok):
    ids = tok.encode(MULTIBYTE).ids
    pieces, row = pull(ids, (), ("日本",), tok.decode)
    done = row.completion()
    assert "".join(pieces) == done.text == "naïve café — " and done.finish_reason == "stop"
    assert tok.decode(done.tokens) == done.text
    assert (done.tokens, done.text, done.finish_reason) == reference(ids, (), ("日本",), tok.decode)


# ---------------------------------------------------------------- stop strings and tokens

WORDS = ["ab", "cd", "e", "x", "y", " ", "abc"]


def words(ids: list[int]) -> str:
    return "".join(WORDS[i] for i in ids)


def ids_of(*ws: str) -> list[int]:
    return [WORDS.index(w) for w in ws]


def test_a_stop_string_split_across_tokens():
    pieces, row = pull(ids_of("x", "ab", "cd", "e"), (), ("bc",), words)
    assert "".join(pieces) == "xa"
    assert (row.tokens, row.text, row.reason) == (ids_of("x"), "xa", "stop")


def test_a_stop_at_the_very_first_token():
    pieces, row = pull(ids_of("abc", "e"), (), ("abc",), words)
    assert pieces == [] and (row.completion().tokens, row.completion().text) == ([], "")
    assert row.reason == "stop"


def test_the_stop_that_completes_first_wins():
    # "bcde" begins before "cd" but is complete one token later: the text is cut at "cd", as before
    tokens = [ord(c) for c in "abcdef"]
    pieces, row = pull(tokens, (), ("bcde", "cd"), lambda ids: "".join(map(chr, ids)))
    assert "".join(pieces) == row.completion().text == "ab"


def test_held_back_text_is_released_when_the_stop_does_not_come():
    pieces, row = pull(ids_of("x", "ab", "y", "e"), (), ("abc",), words)
    assert pieces == ["x", "aby", "e"] and row.completion().finish_reason == "length"


def test_a_stop_token_ends_the_row_and_is_not_output():
    pieces, row = pull(ids_of("x", "ab", "cd", "e"), ids_of("cd"), ("abc",), words)
    assert "".join(pieces) == "xab" and (row.tokens, row.reason) == (ids_of("x", "ab"), "stop")


def test_text_before_an_unfinished_character_waits_for_a_stop_that_ends_in_it():
    """A stop string may end in the character a token began: the text before that character is not final yet.
    (Before: "!ab" was streamed, then the stop "b日" cut the completion to "!a".)"""
    ids = enc(b"!", b"ab", b"\xe6\x97", b"\xa5", b"a")
    assert bytes_decode(ids) == "!ab日a"
    pieces, row = pull(ids, (), ("b日",), bytes_decode)
    assert "".join(pieces) == row.completion().text == "!a"
    assert "".join(e.text for e in push(ids, (), ("b日",), bytes_decode)) == "!a"


# ---------------------------------------------------------------- one implementation, same as before


def test_the_server_and_the_engine_give_the_same_text(tok, long_ids):
    ids = long_ids[:120]
    stop = tok.decode(ids)[150:154]
    for stops in ((), (stop,), ("zzz", stop[2:])):
        pieces, row = pull(ids, (), stops, tok.decode)
        events = push(ids, (), stops, tok.decode)
        assert "".join(e.text for e in events) == "".join(pieces) == row.completion().text
        done = row.completion()
        assert (done.tokens, done.text, done.finish_reason) == reference(ids, (), stops, tok.decode)
        assert events[-1].finish_reason == done.finish_reason


stop_strings = st.lists(st.text(alphabet="ab\u00e9\u65e5!", min_size=1, max_size=4), max_size=3)


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, len(BYTES) - 1), max_size=40),
    stops=stop_strings,
    stop_token=st.sampled_from([None, 0, 13]),
)
def test_incremental_equals_decoding_everything(tokens, stops, stop_token):
    stop_tokens = () if stop_token is None else (stop_token,)
    want_tokens, want_text, want_reason = reference(tokens, stop_tokens, stops, bytes_decode)
    pieces, row = pull(tokens, stop_tokens, stops, bytes_decode)
    done = row.completion()
    assert (done.tokens, done.text, done.finish_reason) == (want_tokens, want_text, want_reason)
    assert "".join(pieces) == want_text
    if tokens:
        events = push(tokens, stop_tokens, stops, bytes_decode)
        assert "".join(e.text for e in events) == want_text and events[-1].finish_reason == want_reason

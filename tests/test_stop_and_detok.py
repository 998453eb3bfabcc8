"""Stop conditions and incremental detokenization."""

from __future__ import annotations

from membound import SamplingParams

TEXT = "Héllo wörld! 日本語のテキスト 🌍🚀 naïve café — ok"


def test_incremental_detokenization_never_emits_broken_utf8(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode(TEXT)
    # Byte-level BPE splits the emoji and CJK characters across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = tok.detokenizer([1], skip_special_tokens=True)
    pieces = [detok.step(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == TEXT


def test_streamed_deltas_add_up_to_the_final_text(smollm2):
    eng = smollm2.engine
    eng.add_request("s", "Write a list of colors:", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    deltas, final = [], None
    while eng.has_unfinished_requests():
        for out in eng.step():
            deltas.append(out.delta_text)
            final = out
    assert final.finished and "".join(deltas) == final.outputs[0].text
    assert final.outputs[0].text == smollm2.tokenizer.decode(final.outputs[0].token_ids)


def test_stop_string_ends_the_output_and_is_not_in_it(smollm2):
    base = smollm2.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))
    text = base[0].outputs[0].text
    assert "Paris" in text
    stop = "aris"  # ends mid-token: the check works on text, not tokens
    out = smollm2.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    comp = out[0].outputs[0]
    assert comp.text == text[: text.index(stop)]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop


def test_stop_strings_are_held_back_while_streaming(smollm2):
    eng = smollm2.engine
    eng.add_request("h", "The capital of France is", SamplingParams(temperature=0, max_tokens=12, stop=["Paris."]))
    seen = ""
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen += out.delta_text
            assert "Par" not in seen or out.finished  # never show a prefix of the stop string early
    assert "Paris" not in seen


def test_stop_token_ids_max_tokens_and_eos(smollm2):
    base = smollm2.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    ids = base[0].outputs[0].token_ids
    assert base[0].outputs[0].finish_reason == "length" and len(ids) == 8
    out = smollm2.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ids[2]])
    )
    assert out[0].outputs[0].token_ids == ids[:3]
    assert out[0].outputs[0].stop_reason == ids[2]
    chat = smollm2.chat([{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=64))
    assert chat[0].outputs[0].finish_reason == "stop"
    assert chat[0].outputs[0].token_ids[-1] == smollm2.tokenizer.eos_token_id


def test_abort_frees_blocks_at_once(smollm2):
    eng = smollm2.engine
    eng.add_request("a", "Tell me a long story.", SamplingParams(max_tokens=100))
    eng.step()
    assert eng.stats().num_free_blocks < eng.stats().num_total_blocks
    assert eng.abort_request("a")
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    assert not eng.abort_request("a")


def test_the_earliest_stop_string_wins_within_one_token():
    from membound.engine.output import append_token
    from membound.engine.request import Request

    class OnePiece:
        def step(self, token_id: int) -> str:
            return "xab"

    req = Request("r", None, [1], SamplingParams(stop=["b", "a"]), 0.0, (), 100, OnePiece(), None)
    append_token(req, 5, None)
    assert req.text == "x" and req.stop_reason == "a" and req.finish_reason == "stop"

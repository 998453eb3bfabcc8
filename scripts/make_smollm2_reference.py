"""Record reference logits for the embedded SmolLM2 GGUF using HF transformers.

transformers dequantizes the GGUF to fp32 and runs its own Llama implementation,
which makes it an independent reference for membound's GGUF loader and model.
Loading the GGUF through transformers takes about a minute, so the numbers are
stored in tests/data/ and this script is only rerun when the test prompt changes.

    pip install accelerate  # transformers needs it to load GGUF models
    python scripts/make_smollm2_reference.py
"""

import json
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from membound.model.registry import default_model_path

PROMPT = "The capital of France is"
TOP_K = 20
GREEDY_STEPS = 16


def main() -> None:
    path = pathlib.Path(default_model_path())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, do_sample=False)
    last = logits[-1]
    top = torch.topk(last, TOP_K)
    ref = {
        "prompt": PROMPT,
        "prompt_token_ids": ids,
        "last_top_ids": top.indices.tolist(),
        "last_top_logits": top.values.tolist(),
        "argmax_per_position": logits.argmax(-1).tolist(),
        "max_logit_per_position": logits.max(-1).values.tolist(),
        "greedy_token_ids": out[0, len(ids) :].tolist(),
    }
    dest = pathlib.Path(__file__).parent.parent / "tests/data/smollm2_q4_1_reference.json"
    dest.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()

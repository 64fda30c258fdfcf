"""Runs inside the vLLM venv. Request (stdin JSON): model (folder), prompts (token id lists),
generate (greedy tokens), model_impl (auto | transformers). Answer (JSON at request's answer_path): per prompt
the logprob vLLM gives each prompt token (position >= 1) and its greedy continuation, or the
error vLLM raised while loading."""

import json
import os
import sys
from pathlib import Path


def main():
    req = json.loads(sys.stdin.read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    try:
        llm = LLM(model=req["model"], dtype="float32", max_model_len=256, max_num_seqs=4, seed=0,
                  model_impl=req.get("model_impl", "auto"), enforce_eager=True)
    except Exception as exc:  # the test asserts on what vLLM said
        Path(req["answer_path"]).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
        return
    params = SamplingParams(max_tokens=req["generate"], temperature=0.0, prompt_logprobs=1, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]], params, use_tqdm=False)
    answer = []
    for ids, out in zip(req["prompts"], outs):
        logprobs = [float(out.prompt_logprobs[p][ids[p]].logprob) for p in range(1, len(ids))]
        answer.append({"prompt_logprobs": logprobs, "tokens": list(out.outputs[0].token_ids),
                       "text": out.outputs[0].text})
    Path(req["answer_path"]).write_text(json.dumps({"results": answer}))


if __name__ == "__main__":
    main()

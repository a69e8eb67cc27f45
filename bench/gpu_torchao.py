"""torchao int8 on CUDA against bf16, on a SmolLM2-135M-shaped Llama (random weights: speed only).

Prefill: one forward of batch 1 x 512 tokens. Decode: tokens/s of greedy generation at batch 1 and 8.
Each figure is the median of 5 repeats after a warm-up; eager and torch.compile'd.
"""
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (max(times) - min(times)) / statistics.median(times)


def measure(model, label):
    prompt = torch.randint(0, 49152, (1, 512), device="cuda")
    prefill, spread = timed(lambda: model(prompt))
    row = [label, f"prefill {prefill * 1e3:.2f} ms (spread {spread:.0%})"]
    for batch in (1, 8):
        ids = torch.randint(0, 49152, (batch, 16), device="cuda")
        new = 64
        seconds, spread = timed(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False), repeats=3)
        row.append(f"decode b{batch} {batch * new / seconds:.0f} tok/s (spread {spread:.0%})")
    print(" | ".join(row), flush=True)


def main():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    probe = torch.randint(0, 49152, (2, 64), device="cuda")
    with torch.inference_mode():
        reference = base(probe).logits.float()
        measure(base, "bf16 eager")
        for name, qconfig in (("int8 weight-only", Int8WeightOnlyConfig()), ("int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
            model = copy.deepcopy(base)
            quantize_(model, qconfig)
            error = (model(probe).logits.float() - reference).abs().max() / reference.abs().max()
            print(f"{name}: max logit error {error:.3%} of the bf16 range", flush=True)
            measure(model, f"{name} eager")
            model.forward = torch.compile(model.forward)
            measure(model, f"{name} torch.compile")
        base.forward = torch.compile(base.forward)
        measure(base, "bf16 torch.compile")


if __name__ == "__main__":
    main()

"""Issue 33 item 3: secateurs' GGUF exports measured where users run them, in llama.cpp on the CPU.

For each model (dense SmolLM2-135M, a uniform width-pruned, a FLAP per-layer width-pruned and a
depth-pruned output), exported at f16 and q8_0 by ``secateurs.model.gguf_export``: llama.cpp's
WikiText-2 perplexity on exactly the windows our own evaluation reads (our tokenization, cut into the
same non-overlapping windows, fed to llama.cpp as token ids; the loss is computed here from its
logits), beside our own perplexity of the same model; and llama.cpp greedy decode tokens/s, every
file timed round-robin in one process, as ratios to the dense GGUF of the same type.

llama.cpp runs through llama-cpp-python, installed in its own virtual environment (it compiles
llama.cpp, minutes; keep it out of the project's venv); this script calls that environment's Python
on itself (``--worker``), which imports only numpy and llama_cpp::

    python -m venv /work/llamacpp-venv && CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF" \
        /work/llamacpp-venv/bin/pip install llama-cpp-python
    SECATEURS_DATA=../shared/data nice -n 5 python benchmarks/gguf_export.py \
        --model dense=smollm2-135m --model width-20%=OUT_WIDTH --model flap-global=OUT_FLAP \
        --model depth-6=OUT_DEPTH --windows 40
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(spec_path: str) -> None:
    """Runs under llama-cpp-python's interpreter. ``ppl``: the perplexity of one GGUF over the given
    windows (``logits_all``; the loss computed here from its logits) and its tokenization of a sample;
    ``speed``: greedy decode tokens/s of every GGUF, timed round-robin so each sees the same load."""
    import numpy as np
    from llama_cpp import Llama, llama_cpp

    defaults = llama_cpp.llama_model_default_params

    def without_extra_buffers():  # AMX / repacked weights: this build crashes in them here, any quantized file
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = without_extra_buffers
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"llama_cpp_python": __import__("llama_cpp").__version__, "extra_buffer_types": False,
                    "system_info": llama_cpp.llama_print_system_info().decode()}
    if spec["task"] == "ppl":
        windows = spec["windows"]
        seq_len = len(windows[0])
        llm = Llama(spec["gguf"], n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, logits_all=True,
                    n_threads=spec["threads"], verbose=False)
        nll, count = 0.0, 0
        for window in windows:
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: seq_len - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            nll += float((log_z - logits[np.arange(seq_len - 1), np.asarray(window[1:])]).sum())
            count += seq_len - 1
        result.update(ppl=math.exp(nll / count), tokens=count,
                      sample_ids=llm.tokenize(spec["sample_text"].encode(), add_bos=False, special=False))
    else:
        models = {path: Llama(path, n_ctx=spec["prompt_len"] + spec["decode"] + 8, n_threads=spec["threads"], verbose=False)
                  for path in spec["ggufs"]}
        runs: dict[str, list[float]] = {path: [] for path in models}
        for _ in range(spec["repeats"]):
            for path, llm in models.items():
                llm.reset()
                llm.eval(spec["prompt"])
                start = time.perf_counter()
                for _ in range(spec["decode"]):
                    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
                runs[path].append(spec["decode"] / (time.perf_counter() - start))
        result["decode_runs"] = runs
    Path(spec["result"]).write_text(json.dumps(result))


def run_worker(python: str, spec: dict, folder: Path, name: str) -> dict:
    """Run :func:`worker` under llama-cpp-python's interpreter and read back what it wrote."""
    spec_file = folder / f"{name}.spec.json"
    spec["result"] = str(folder / f"{name}.result.json")
    spec_file.write_text(json.dumps(spec))
    subprocess.run([python, __file__, "--worker", str(spec_file)], check=True)
    return json.loads(Path(spec["result"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", action="append", default=[], help="label=MODEL (the first is the dense baseline)")
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--llama-python", default="/work/llamacpp-venv/bin/python")
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows (the first N)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp threads (1: on a shared 2-core machine, 2 threads spin against other work)")
    parser.add_argument("--decode", type=int, default=64, help="tokens decoded per timing run")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin decode rounds (the best is kept)")
    parser.add_argument("--data-dir", default=os.environ.get("SECATEURS_DATA"))
    parser.add_argument("--keep", help="folder to keep the GGUF files in (default: a temporary folder)")
    parser.add_argument("--json", default=str(HERE / "results" / "gguf_export.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import torch

    from secateurs.api import evaluate_perplexity
    from secateurs.data.calib import tokenize
    from secateurs.data.sources import load_text
    from secateurs.evaluate.perplexity import windows_of
    from secateurs.files import write_atomic
    from secateurs.model.gguf_export import export_gguf
    from secateurs.model.load import load_model

    torch.set_num_threads(args.threads)
    models = [item.split("=", 1) for item in args.model] or [["dense", "smollm2-135m"]]
    types = args.types.split(",")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    sample = "The quick brown fox jumps over the lazy dog, 1234 times in 2024."
    rows = []
    for label, source in models:
        loaded = load_model(source)
        ids = tokenize(loaded.tokenizer, load_text("wikitext2", "test", args.data_dir))
        windows = windows_of(ids, args.seq_len, args.windows)
        start = time.perf_counter()
        ours = evaluate_perplexity(loaded, ["wikitext2"], args.seq_len, args.windows, args.data_dir, "cpu")["wikitext2"]
        ours_seconds = time.perf_counter() - start
        params = sum(p.numel() for p in loaded.model.parameters())
        our_ids = loaded.tokenizer(sample, add_special_tokens=False)["input_ids"]
        for gguf_type in types:
            path = folder / f"{label}-{gguf_type}.gguf"
            report = export_gguf(loaded, path, gguf_type)
            spec = {"task": "ppl", "gguf": str(path), "windows": windows.tolist(), "threads": args.threads,
                    "sample_text": sample}
            measured = run_worker(args.llama_python, spec, folder, f"{label}-{gguf_type}-ppl")
            meta = {k: measured[k] for k in ("llama_cpp_python", "system_info")}
            row = {"label": label, "source": source, "type": gguf_type, "arch": report.arch, "params": params,
                   "layers": loaded.model.config.num_hidden_layers, "file_mib": report.bytes / 2**20,
                   "tensor_types": report.tensor_types, "ours_ppl": ours.ppl, "ours_seconds": ours_seconds,
                   "llama_cpp_ppl": measured["ppl"], "tokens": measured["tokens"],
                   "ppl_gap": measured["ppl"] / ours.ppl - 1, "gguf": str(path),
                   "same_tokenization": measured["sample_ids"] == our_ids}
            rows.append(row)
            print(f"{label:>10} {gguf_type:>5} ({report.arch})  ours {ours.ppl:8.3f}  llama.cpp {measured['ppl']:8.3f} "
                  f"({row['ppl_gap']:+.2%})  {row['file_mib']:6.1f} MiB  same tokens: {row['same_tokenization']}", flush=True)
        prompt = windows[0][:32].tolist()
        del loaded
    spec = {"task": "speed", "ggufs": [row["gguf"] for row in rows], "threads": args.threads, "decode": args.decode,
            "prompt": prompt, "prompt_len": len(prompt), "repeats": args.repeats}
    speeds = run_worker(args.llama_python, spec, folder, "speed")["decode_runs"]
    for row in rows:
        row["decode_runs"] = speeds[row["gguf"]]
        row["decode_tokens_per_s"] = max(row["decode_runs"])
    for row in rows:
        dense = next(r for r in rows if r["label"] == rows[0]["label"] and r["type"] == row["type"])
        row["decode_vs_dense"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        row["params_vs_dense"] = row["params"] / dense["params"]
        print(f"{row['label']:>10} {row['type']:>5}  decode {row['decode_tokens_per_s']:6.1f} tok/s "
              f"({row['decode_vs_dense']:.2f}x dense), params {row['params_vs_dense']:.2f}x")
    document = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), shared",
                "threads": args.threads, "windows": args.windows, "seq_len": args.seq_len, "decode_tokens": args.decode,
                "repeats": args.repeats, **meta, "rows": rows, "command": " ".join(sys.argv)}
    write_atomic(Path(args.json), json.dumps(document, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()

"""Ask an exported mmoe model about one or more images, streaming the answer; or answer a JSONL file.

Single question (tokens are printed as they are generated; the last stdout line is the answer)::

    python -m mmoe.inference --model EXPORT_DIR --image cat.png --prompt "What is in the picture?"
    mmoe-infer --model EXPORT_DIR --image a.png --image b.png --prompt "<image> vs <image>: which is bigger?"

``<image>`` placeholders mark where each image goes (in ``--image`` order); with none, one per image is put
in front of the prompt. ``--short-answer`` appends LLaVA's "Answer the question using a single word or
phrase." instruction (the wording used in training VQA data). Sampling: ``--temperature`` (0 = greedy,
the default), ``--top-p``, ``--seed``; ``--max-new-tokens`` bounds the answer.

Routing maps (single question only): ``--routing-map map.png`` draws which expert each image patch took in
every MoE ViT layer and which expert every generated token took in every MoE decoder layer;
``--routing-json map.json`` writes the raw assignments (see :mod:`mmoe.inference.routing_map`).

Batch mode::

    mmoe-infer --model EXPORT_DIR --jsonl questions.jsonl --out answers.jsonl [--batch-size 8]

Each input line is ``{"image": "path" | ["p1", "p2"] | null, "prompt": "...", ...}``; every line comes back
(same order, extra keys kept) with ``"answer"``, or with ``"error"`` naming the unreadable image / bad
field; errors are counted and listed on stderr at the end. Relative image paths are resolved against
``--image-root`` (default: the current directory). Progress goes to stderr.

Errors (missing model directory, missing or unreadable image, empty prompt, placeholder count that does
not match the images, ...) print ``error: ...`` on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

IMAGE_TOKEN = "<image>"


class CLIError(Exception):
    """Bad input; printed as ``error: ...`` with exit code 2."""


# ------------------------------------------------------------------------------------------- helpers
def check_prompt(prompt: str | None, n_images: int) -> str:
    """The prompt the pipeline gets; raises CLIError for an empty prompt or a placeholder mismatch."""
    if prompt is None or not str(prompt).strip() or not str(prompt).replace(IMAGE_TOKEN, "").strip():
        raise CLIError("empty prompt: give a question or an instruction (--prompt)")
    prompt = str(prompt)
    n = prompt.count(IMAGE_TOKEN)
    if n and n != n_images:
        few = "too few" if n < n_images else "too many"
        raise CLIError(f"{few} '{IMAGE_TOKEN}' placeholders: the prompt has {n} for {n_images} image(s)")
    return prompt


def load_images(paths: list[str], root: Path | None = None) -> list:
    """Open every image (RGB); CLIError naming the file when one is missing or unreadable."""
    from mmoe.data.images import ImageLoadError, load_image

    out = []
    for p in paths:
        if not isinstance(p, str) or not p:
            raise CLIError(f"image path must be a non-empty string, got {p!r}")
        path = Path(p)
        if root is not None and not path.is_absolute():
            path = root / path
        try:
            out.append(load_image(path))
        except ImageLoadError as e:
            raise CLIError(str(e)) from None
    return out


def open_pipeline(model_dir: str | None, device: str | None, quantize: str | None = None):
    if not model_dir:
        raise CLIError("--model EXPORT_DIR is required")
    p = Path(model_dir)
    if not p.is_dir():
        raise CLIError(f"model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise CLIError(f"{p} is not an exported mmoe model: config.json is missing")
    from mmoe.inference.pipeline import load_pipeline

    try:
        return load_pipeline(p, device=device, quantize=quantize)
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        raise CLIError(f"cannot load model {p}: {e}") from None


class TokenStreamer:
    """stream_callback for VLMPipeline.generate: decodes the growing answer and writes only the new text.

    Mirrors the pipeline's final decode (special tokens skipped, stop at EOS, surrounding whitespace
    stripped), holding back trailing whitespace so what was written is always a prefix of the answer.
    """

    def __init__(self, tokenizer, out: TextIO, row: int = 0, eos_token_id: int | None = None):
        self.tok, self.out, self.row = tokenizer, out, row
        self.eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.ids: list[int] = []
        self.done = False
        self.written = ""

    def __call__(self, step: int, tokens) -> None:
        if self.done:
            return
        tid = int(tokens[self.row])
        self.ids.append(tid)
        if self.eos is not None and tid == self.eos:
            self.done = True
        text = self.tok.decode(self.ids, skip_special_tokens=True).strip()
        if text.startswith(self.written) and len(text) > len(self.written):
            self.out.write(text[len(self.written):])
            self.out.flush()
            self.written = text

    def finish(self, final: str) -> None:
        """End the streamed line so that it reads `final` (the pipeline's answer)."""
        if final.startswith(self.written):
            self.out.write(final[len(self.written):] + "\n")
        else:  # the tokenizer revised earlier text: print the answer again on its own line
            self.out.write("\n" + final + "\n")
        self.out.flush()


# ------------------------------------------------------------------------------------------- single
def run_single(pipe, images: list, prompt: str, args, out: TextIO = sys.stdout) -> str:
    """Stream one answer to `out`; optionally write the routing map / JSON. Returns the answer."""
    want_routing = bool(args.routing_map or args.routing_json)
    streamer = TokenStreamer(pipe.tokenizer, out) if not args.no_stream else None
    ids: list[int] = []

    def callback(step, tokens):
        ids.append(int(tokens[0]))
        if streamer is not None:
            streamer(step, tokens)

    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              short_answer=args.short_answer, seed=args.seed, stream_callback=callback)
    try:
        if want_routing:
            from mmoe.inference.routing_map import capture_routing

            with capture_routing(pipe.model) as rec:
                answer = pipe.generate([images], [prompt], **kw)[0]
        else:
            answer = pipe.generate([images], [prompt], **kw)[0]
    except ValueError as e:  # placeholder / context-length problems found by the pipeline
        raise CLIError(str(e)) from None
    if streamer is not None:
        streamer.finish(answer)
    else:
        out.write(answer + "\n")
        out.flush()
    if want_routing:
        from mmoe.inference.routing_map import plot_routing_map, write_routing_json

        eos = pipe.tokenizer.eos_token_id
        gen = ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids
        data = rec.to_json(pipe.tokenizer, gen)
        data["prompt"], data["answer"] = prompt, answer
        if args.routing_json:
            write_routing_json(data, args.routing_json)
            print(f"routing assignments written to {args.routing_json}", file=sys.stderr)
        if args.routing_map:
            plot_routing_map(data, images, [t["text"] for t in data["tokens"]], args.routing_map,
                             title=f"{prompt!r} -> {answer!r}")
            print(f"routing map written to {args.routing_map}", file=sys.stderr)
    return answer


# ------------------------------------------------------------------------------------------- batch
def _read_jsonl(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, object or None, error or None) per non-empty line."""
    if not path.is_file():
        raise CLIError(f"JSONL file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((n, None, f"{path}:{n}: not valid JSON ({e})"))
            continue
        if not isinstance(obj, dict):
            rows.append((n, None, f"{path}:{n}: expected a JSON object, got {type(obj).__name__}"))
            continue
        rows.append((n, obj, None))
    return rows


def run_batch(pipe, args, progress: bool = True) -> dict:
    """Answer every line of args.jsonl into args.out; returns {"answered", "errors", "error_lines"}."""
    from tqdm import tqdm

    src, dst = Path(args.jsonl), Path(args.out)
    root = Path(args.image_root) if args.image_root else None
    rows = _read_jsonl(src)
    results: list[dict] = []
    pending: list[tuple[int, list, str]] = []  # (index in results, images, prompt)

    def flush():
        if not pending:
            return
        try:
            answers = pipe.generate([p[1] for p in pending], [p[2] for p in pending],
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, short_answer=args.short_answer, seed=args.seed)
            for (i, _, _), a in zip(pending, answers):
                results[i]["answer"] = a
        except ValueError:
            for i, ims, pr in pending:  # retry one by one so one bad line does not sink its batch
                try:
                    results[i]["answer"] = pipe.generate([ims], [pr], max_new_tokens=args.max_new_tokens,
                                                         temperature=args.temperature, top_p=args.top_p,
                                                         short_answer=args.short_answer, seed=args.seed)[0]
                except ValueError as e:
                    results[i]["error"] = f"line {results[i]['_line']}: {e}"
        pending.clear()

    for n, obj, err in tqdm(rows, desc="answering", unit="q", file=sys.stderr, disable=not progress):
        rec = dict(obj) if obj is not None else {}
        rec["_line"] = n
        results.append(rec)
        if err is not None:
            rec["error"] = err
            continue
        try:
            imgs = obj.get("image", obj.get("images"))
            paths = [] if imgs is None else ([imgs] if isinstance(imgs, str) else imgs)
            if not isinstance(paths, list):
                raise CLIError(f"'image' must be a path or a list of paths, got {type(imgs).__name__}")
            prompt = check_prompt(obj.get("prompt"), len(paths))
            images = load_images(paths, root)
        except CLIError as e:
            rec["error"] = f"line {n}: {e}"
            continue
        pending.append((len(results) - 1, images, prompt))
        if len(pending) >= args.batch_size:
            flush()
    flush()
    dst.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    with dst.open("w", encoding="utf-8") as f:
        for rec in results:
            rec.pop("_line", None)
            if "error" in rec:
                errors.append(rec["error"])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"answered": len(results) - len(errors), "errors": len(errors), "error_lines": errors}


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmoe-infer", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="exported model directory (config.json + model.safetensors + tokenizer)")
    ap.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    ap.add_argument("--prompt", help="question or instruction; '<image>' marks where each image goes")
    ap.add_argument("--jsonl", help="batch mode: JSONL of {\"image\": path | [paths], \"prompt\": ...}")
    ap.add_argument("--out", help="batch mode: output JSONL (input lines + \"answer\" or \"error\")")
    ap.add_argument("--image-root", help="batch mode: directory for relative image paths (default: cwd)")
    ap.add_argument("--batch-size", type=int, default=8, help="batch mode: questions per forward (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible answers)")
    ap.add_argument("--short-answer", action="store_true",
                    help="append 'Answer the question using a single word or phrase.'")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--quantize", choices=["int8"], default=None,
                    help="int8 weight-only quantisation of the linears (routers excepted); needs torchao")
    ap.add_argument("--no-stream", action="store_true", help="print the answer only when it is complete")
    ap.add_argument("--routing-map", help="write a PNG of the expert chosen per image patch and per token")
    ap.add_argument("--routing-json", help="write the raw routing assignments as JSON")
    return ap


def _validate(args) -> None:
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.jsonl:
        if not args.out:
            raise CLIError("--jsonl needs --out OUT.jsonl")
        if args.image or args.prompt is not None:
            raise CLIError("--jsonl takes images and prompts from the file; drop --image / --prompt")
        if args.routing_map or args.routing_json:
            raise CLIError("--routing-map / --routing-json work with a single --prompt, not --jsonl")
        if not Path(args.jsonl).is_file():
            raise CLIError(f"JSONL file not found: {args.jsonl}")
    elif args.out:
        raise CLIError("--out is for --jsonl batch mode")


def main(argv: list[str] | None = None, stdout: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = stdout or sys.stdout
    try:
        _validate(args)
        if args.jsonl:
            pipe = open_pipeline(args.model, args.device, args.quantize)
            summary = run_batch(pipe, args)
            print(f"wrote {summary['answered'] + summary['errors']} lines to {args.out}: "
                  f"{summary['answered']} answered, {summary['errors']} errors", file=sys.stderr)
            for e in summary["error_lines"]:
                print(f"  {e}", file=sys.stderr)
            return 0
        prompt = check_prompt(args.prompt, len(args.image))
        model_dir = args.model
        if not model_dir or not Path(model_dir).is_dir():  # check before loading images (cheaper first)
            open_pipeline(model_dir, args.device)
        images = load_images(args.image)
        pipe = open_pipeline(model_dir, args.device, args.quantize)
        run_single(pipe, images, prompt, args, out)
        return 0
    except CLIError as e:
        out.flush()
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

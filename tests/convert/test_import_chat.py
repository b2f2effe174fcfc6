"""A pretrained instruct model end to end: one import for a Hugging Face folder, a .safetensors file and a .gguf file
(same logits), its chat template and end-of-turn id kept through import, extract, export-hf and a fine-tune, and a
real server whose chat replies render that template and stop at that token (the official openai client)."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import AddedToken  # noqa: E402

from matryoshka_lm.cli import main  # noqa: E402
from matryoshka_lm.convert.extract import extract_submodel  # noqa: E402
from matryoshka_lm.convert.gguf import export_gguf  # noqa: E402
from matryoshka_lm.convert.hf import export_hf  # noqa: E402
from matryoshka_lm.convert.hf_import import import_model  # noqa: E402
from matryoshka_lm.core import checkpoint as ck  # noqa: E402
from matryoshka_lm.core.chat import read_chat  # noqa: E402

EOT = "<|endoftext|>"
# ChatML, as SmolLM2-Instruct's: a turn ends with <|im_end|>, a token of its own
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory, corpus_file):
    """A tiny random Llama folder built by transformers, with a ChatML template and <|im_end|> as its eos."""
    from _tiny_ckpt import make_checkpoint

    tmp = tmp_path_factory.mktemp("instruct")
    tok = ck.load_tokenizer(make_checkpoint(tmp / "ours", corpus_file))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    im_end = tok.token_to_id("<|im_end|>")
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,  # widths that split into int8 groups of 32, as the README's XL@int8 needs
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=128,  # room for the README's max_tokens=64 after a chat prompt
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        eos_token_id=im_end,
    )
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    folder = tmp / "TinyChat-Instruct"
    model.save_pretrained(str(folder))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token=EOT)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    transformers.GenerationConfig(eos_token_id=im_end, bos_token_id=tok.token_to_id(EOT)).save_pretrained(folder)
    return folder, im_end


def logits(ckpt, x):
    with torch.no_grad():
        return ck.load_model(ckpt)(x)


def test_one_import_for_folder_safetensors_and_gguf_same_logits(instruct, tmp_path):
    folder, im_end = instruct
    a = import_model(folder, tmp_path / "a", reorder=False)
    b = import_model(folder / "model.safetensors", tmp_path / "b", reorder=False)
    gguf = export_gguf(a, "XL", tmp_path / "tiny.gguf")  # a GGUF of the same weights, read back by transformers
    c = import_model(gguf, tmp_path / "c", reorder=False)
    x = torch.randint(0, 300, (2, 16))
    want = logits(a, x)
    assert torch.equal(logits(b, x), want)
    assert (logits(c, x) - want).abs().max() <= 1e-4
    for ckpt in (a, b, c):  # every route keeps the template and the end-of-turn id
        chat = read_chat(ckpt)
        assert chat.template == TEMPLATE and im_end in chat.stop_ids, ckpt
    assert read_chat(a).name == "TinyChat-Instruct"
    with pytest.raises(Exception, match="a .safetensors file imports with the config.json"):
        lone = tmp_path / "lone.safetensors"
        lone.write_bytes((folder / "model.safetensors").read_bytes())
        import_model(lone, tmp_path / "d")


def test_chat_format_survives_extract_export_hf_and_a_fine_tune(instruct, tmp_path, corpus_file):
    folder, im_end = instruct
    imp = import_model(folder, tmp_path / "imp", reorder=False, nest=("heads", "ffn"))
    small = extract_submodel(imp, "S", tmp_path / "small")
    assert read_chat(small) == read_chat(imp)
    hf = export_hf(imp, "XL", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    messages = [{"role": "user", "content": "Hi there"}]
    want = read_chat(imp).render(messages)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert transformers.GenerationConfig.from_pretrained(str(hf)).eos_token_id == im_end
    tuned = tmp_path / "tuned"
    args = ["train", "--init", str(imp), "--out", str(tuned), "--steps", "1", "--batch-size", "2", "--seq-len", "16"]
    assert main([*args, "--data", str(corpus_file), "--max-corpus-chars", "20000", "--quiet", "--device", "cpu"]) == 0
    assert read_chat(tuned) == read_chat(imp)


def test_chat_renders_the_template_and_stops_at_its_end_of_turn(instruct, tmp_path):
    """Through a real uvicorn server and the openai client: the prompt is the model's template, and a reply ends at
    <|im_end|> with finish_reason "stop" (forced here with logit_bias, since the weights are random), streamed and
    not; ignoring eos runs to the length limit instead."""
    openai = pytest.importorskip("openai")
    from _loopback import LoopbackServer
    from matryoshka_lm.serve.app import create_app

    folder, im_end = instruct
    imp = import_model(folder, tmp_path / "imp", reorder=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}]
    prompt_ids = ck.load_tokenizer(imp).encode(read_chat(imp).render(messages)).ids
    with LoopbackServer(create_app(imp, name="tiny")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
        kw = dict(model="tiny:XL", messages=messages, max_tokens=8, temperature=0)
        r = client.chat.completions.create(**kw, logit_bias={str(im_end): 100})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
        assert r.usage.prompt_tokens == len(prompt_ids)  # the model's own template, not "User: ..."
        chunks = list(client.chat.completions.create(**kw, logit_bias={str(im_end): 100}, stream=True))
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        r = client.chat.completions.create(**kw, logit_bias={str(im_end): 100}, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
        cards = {m.id: m for m in client.models.list().data}
        assert "tiny:XL" in cards


def test_import_cli_names_the_chat_format(instruct, tmp_path, capsys):
    folder, im_end = instruct
    assert main(["import", str(folder), "-o", str(tmp_path / "c"), "--no-reorder"]) == 0
    err = capsys.readouterr().err
    assert "TinyChat-Instruct: its own chat template" in err and f"[{im_end}" in err
    assert json.loads((tmp_path / "c" / "chat.json").read_text())["stop_ids"][0] == im_end


def test_an_imports_untrained_slices_are_marked_until_a_fine_tune_trains_them(instruct, tmp_path, corpus_file, capsys):
    """After an import only XL is a model: eval marks the others, generate --size all skips them, the server lists
    them as untrained; a fine-tune that trains every size makes them sizes."""
    import httpx

    from _loopback import LoopbackServer
    from matryoshka_lm.serve.app import create_app

    folder, _ = instruct
    imp = import_model(folder, tmp_path / "imp", reorder=False)
    assert ck.trained_sizes(imp) == ["XL"]
    assert (
        main(["eval", str(imp), "--batches", "1", "--data", str(corpus_file), "--json", str(tmp_path / "e.json")]) == 0
    )
    out = capsys.readouterr().out
    assert "| XL |" in out and "| S (untrained) |" in out
    rows = {r["size"]: r["trained"] for r in json.loads((tmp_path / "e.json").read_text())["sizes"]}
    assert rows == {"XL": True, "L": False, "M": False, "S": False}
    assert main(["generate", str(imp), "--size", "all", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    got = capsys.readouterr()
    assert "[XL]" not in got.out and "skipping L, M, S, not trained yet" in got.err  # one size: no [XL] label
    assert re.search(r"XL: prefill \d+ tokens in \d+ ms .*decode 1 tokens", got.err), got.err  # speed, on stderr
    with LoopbackServer(create_app(imp, name="tiny")) as server:
        cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert cards["tiny:XL"]["trained"] and not cards["tiny:S"]["trained"] and not cards["tiny:S@int4"]["trained"]
        assert httpx.get(f"{server.url}/health").json()["untrained"] == ["L", "M", "S"]
    tuned = tmp_path / "tuned"
    args = ["train", "--init", str(imp), "--out", str(tuned), "--steps", "1", "--batch-size", "2", "--seq-len", "16"]
    assert main([*args, "--data", str(corpus_file), "--max-corpus-chars", "20000", "--quiet", "--device", "cpu"]) == 0
    assert ck.trained_sizes(tuned) == ["XL", "L", "M", "S"]


def test_the_readme_commands_run_on_a_tiny_instruct_llama(instruct, tmp_path, capsys):
    """The README's "Your own pretrained model" commands, as written, with the tiny Llama's GGUF for SmolLM2's and
    a loopback server for `serve`: the docs cannot drift from what runs."""
    import contextlib
    import io
    import shlex
    from pathlib import Path

    from _loopback import LoopbackServer
    from matryoshka_lm.serve.app import create_app

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("<!-- pretrained:start -->")[1].split("<!-- pretrained:end -->")[0]
    bash = re.findall(r"```bash\n(.*?)```", block, re.S)[0]
    python = re.findall(r"```python\n(.*?)```", block, re.S)[0]
    folder, _ = instruct
    gguf = export_gguf(import_model(folder, tmp_path / "src", reorder=False), "XL", tmp_path / "Tiny-Instruct.gguf")
    run = tmp_path / "smol"
    commands = [line.split("  #")[0].strip() for line in bash.splitlines() if line.startswith(".venv/bin/matryoshka")]
    assert [c.split()[1] for c in commands] == ["import", "eval", "generate", "serve"]
    serve_args = None
    for cmd in commands:
        args = shlex.split(cmd.replace('"$GGUF"', str(gguf)).replace("runs/smol", str(run)))[1:]
        if args[0] == "serve":
            serve_args = args
            continue
        assert main(args) == 0, cmd
    out = capsys.readouterr()
    assert "| L (untrained) |" in out.out and "skipping L, M, S, not trained yet" in out.err
    name = serve_args[serve_args.index("--name") + 1]
    with LoopbackServer(create_app(serve_args[1], name=name)) as server:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(python.replace("http://127.0.0.1:8000", server.url), {})
    assert printed.getvalue().split()[-1] in ("stop", "length")  # random weights: where it ends is chance

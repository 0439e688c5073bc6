"""Real model code nobody here wrote: Hugging Face ``transformers`` models from tiny configs
(random init, no downloads), each with inputs that make it return a loss."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

transformers_logging = tf.logging
transformers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*loss_type=None.*")

V = 50      # vocabulary


@dataclass
class RealModel:
    name: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[int, int, torch.Generator], dict]   # (batch, sequence length, generator) -> kwargs
    routed: int          # σ' nodes that get T (as the reference counts them)
    plain: tuple[str, ...] = ()   # σ' nodes located but on the plain gradient
    rtol: float = 1e-9   # models that compute in float32 inside a float64 model (HF's RMSNorms) need more
    # where inductor generates the code: float32 parts (a causal-LM loss upcast to float32, float32
    # rotary tables) round differently from eager's, by ~1e-6 relative (plain torch.compile as well)
    compiled_rtol: float | None = None


def _text(b, t, gen):
    return {"input_ids": torch.randint(0, V, (b, t), generator=gen)}


def _lm(b, t, gen):
    return {**_text(b, t, gen), "labels": torch.randint(0, V, (b, t), generator=gen)}


def _cls(b, t, gen):
    return {**_text(b, t, gen), "labels": torch.randint(0, 3, (b,), generator=gen)}


def _image(size):
    def inputs(b, t, gen):
        return {"pixel_values": torch.randn(b, 3, size, size, generator=gen, dtype=torch.float64),
                "labels": torch.randint(0, 3, (b,), generator=gen)}
    return inputs


def _seq2seq(b, t, gen):
    return {**_text(b, t, gen), "labels": torch.randint(0, V, (b, t - 1), generator=gen)}


def _clip(b, t, gen):
    return {**_text(b, t, gen), "pixel_values": torch.randn(b, 3, 8, 8, generator=gen, dtype=torch.float64),
            "return_loss": True}


def _audio(b, t, gen):
    return {"input_values": torch.randn(b, 40 * t, generator=gen, dtype=torch.float64),
            "labels": torch.randint(0, 3, (b,), generator=gen)}


_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

ZOO = [
    RealModel("gpt2", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=0, eos_token_id=0)), _lm, routed=16),
    RealModel("bert", lambda: tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, **_NO_DROPOUT)), _cls, routed=22),
    RealModel("llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16)), _lm, routed=21, rtol=1e-5),
    RealModel("t5", lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)),
        _seq2seq, routed=51, rtol=1e-4),
    RealModel("vit", lambda: tf.ViTForImageClassification(tf.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, **_NO_DROPOUT)), _image(8), routed=21),
    RealModel("distilbert", lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16, dropout=0,
        attention_dropout=0, seq_classif_dropout=0, num_labels=3)), _cls, routed=21),
    RealModel("convnext", lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
        num_channels=3, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=8,
        num_labels=3, drop_path_rate=0.0)), _image(8), routed=16),
    RealModel("swin", lambda: tf.SwinForImageClassification(tf.SwinConfig(
        image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[2], num_heads=[2], window_size=4,
        mlp_ratio=2.0, drop_path_rate=0, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        _image(16), routed=22),
    RealModel("deit", lambda: tf.DeiTForImageClassification(tf.DeiTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, **_NO_DROPOUT)), _image(8), routed=21),
    RealModel("bloom", lambda: tf.BloomForCausalLM(tf.BloomConfig(
        vocab_size=V, hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0, attention_dropout=0)), _lm, routed=16,
        rtol=1e-5),
    RealModel("clip", lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config={"vocab_size": V, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
        projection_dim=8)), _clip, routed=26, plain=("logit_scale.mul",)),
    RealModel("gpt_neox", lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout=0, attention_dropout=0)), _lm, routed=15, compiled_rtol=1e-5),
    RealModel("gemma", lambda: tf.GemmaForCausalLM(tf.GemmaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=16)), _lm, routed=21, rtol=1e-5),
    RealModel("opt", lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16, dropout=0, attention_dropout=0)), _lm, routed=20,
        compiled_rtol=1e-5),
    # FalconLinear: `x @ self.weight.T` (a transpose by attribute); parallel attention, multi-query;
    # float32 rotary tables (1e-5)
    RealModel("falcon", lambda: tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, hidden_dropout=0.0,
        attention_dropout=0.0, new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False,
        bias=False)), _lm, routed=13, rtol=1e-5),
    RealModel("mamba", lambda: tf.MambaForCausalLM(tf.MambaConfig(
        vocab_size=V, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
        time_step_rank=4, use_mambapy=False)), _lm, routed=19,
        plain=("backbone.layers.0.mixer.mul", "backbone.layers.1.mixer.mul"), rtol=1e-5),
    # Its feature encoder sets requires_grad on a tensor and its encoder reads a ContextVar that
    # Hugging Face's output capturing set in a frame TorchDynamo ran eagerly: the encoder's own
    # forward runs uncompiled, and its LayerNorm gets a graph of its own (svgd_fx.capture.eager_layers).
    RealModel("wav2vec2", lambda: tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        hidden_dropout=0, attention_dropout=0, activation_dropout=0, feat_proj_dropout=0, layerdrop=0,
        mask_time_prob=0, num_labels=3, classifier_proj_size=8)), _audio, routed=17),
]
MODELS = {m.name: m for m in ZOO}


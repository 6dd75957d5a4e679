"""Plugin suites whose trunks are transformers written the ways people write them.

- `make_mha`: a ViT whose blocks use `torch.nn.MultiheadAttention` (torchvision's layout):
  patch-embedding conv, cls token, position embedding, pre-norm blocks, GELU MLP.
- `make_timm`: a ViT whose attention is one fused `qkv` Linear reshaped to
  (B, N, 3, heads, head_dim) and a `proj` Linear (timm's `Attention`).
- `make_hf`: a text encoder over token ids in the Hugging Face BERT layout: word and position
  `nn.Embedding`s, separate `query` / `key` / `value` Linears, a `dense` output Linear in a
  sibling module, post-norm LayerNorms, mean pooling.

Images come from a small `multidigits`, token ids from a small `sequences` suite. Each is a
`module:function` plugin: `prunefuse search --suite tests.plugins.attention_suites:make_timm`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mtl_models.models import MTLModel
from mtl_models.suites import get


# --- the torchvision-style ViT (nn.MultiheadAttention) ---

class MHABlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class MHAViT(nn.Module):
    def __init__(self, in_channels=1, image=10, patch=2, dim=32, depth=2, heads=4, mlp_dim=64):
        super().__init__()
        self.conv_proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, (image // patch) ** 2 + 1, dim).normal_(std=0.02))
        self.layers = nn.Sequential(*[MHABlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.layers(x + self.pos_embedding)
        return self.ln(x)[:, 0]


# --- the timm-style ViT (fused qkv) ---

class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), nn.GELU(), nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    def __init__(self, in_chans=1, img_size=10, patch_size=2, embed_dim=32, depth=2, num_heads=4):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * .02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.norm(x)[:, 0]


# --- the Hugging Face BERT-style text encoder (separate query / key / value) ---

class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(max_position_embeddings).expand((1, -1)), persistent=False)

    def forward(self, input_ids):
        positions = self.position_ids[:, :input_ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, hidden_size, num_attention_heads):
        super().__init__()
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(hidden_size, self.all_head_size)
        self.key = nn.Linear(hidden_size, self.all_head_size)
        self.value = nn.Linear(hidden_size, self.all_head_size)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_x_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states):
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        context_layer = torch.matmul(attention_probs, value_layer).permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.all_head_size,)
        return context_layer.view(new_context_layer_shape)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, hidden_size, num_attention_heads):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_attention_heads)
        self.output = BertSelfOutput(hidden_size)

    def forward(self, hidden_states):
        return self.output(self.self(hidden_states), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, intermediate_size, hidden_size):
        super().__init__()
        self.dense = nn.Linear(intermediate_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, hidden_size, num_attention_heads, intermediate_size):
        super().__init__()
        self.attention = BertAttention(hidden_size, num_attention_heads)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = BertOutput(intermediate_size, hidden_size)

    def forward(self, hidden_states):
        attention_output = self.attention(hidden_states)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, vocab_size=8, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.layer = nn.ModuleList([BertLayer(hidden_size, num_attention_heads, intermediate_size)
                                    for _ in range(num_hidden_layers)])

    def forward(self, input_ids):
        hidden_states = self.embeddings(input_ids)
        for layer in self.layer:
            hidden_states = layer(hidden_states)
        return hidden_states.mean(dim=1)


# --- the suites ---

class TransformerFactory:
    """model_factory(suite, trunk=..., **spec): a class, so the suite pickles into Ray tasks."""

    def __init__(self, layout: str):
        self.layout = layout

    def __call__(self, suite, trunk: str = "mlp", dim: int = 32, depth: int = 2, heads: int = 4):
        if self.layout == "mha":
            body = MHAViT(suite.input_shape[0], suite.input_shape[1], dim=dim, depth=depth, heads=heads,
                          mlp_dim=2 * dim)
        elif self.layout == "timm":
            body = TimmViT(suite.input_shape[0], suite.input_shape[1], embed_dim=dim, depth=depth, num_heads=heads)
        else:
            vocab = int(max(int(s.x.max()) for s in (suite.train, suite.val, suite.test))) + 1
            body = BertEncoder(vocab, suite.input_shape[0], dim, depth, heads, 2 * dim)
        return MTLModel(body, {t.name: nn.Linear(dim, t.num_outputs) for t in suite.tasks})


def _images(layout, seed, train_pairs, val_pairs, test_pairs):
    suite = get("multidigits", seed=seed, train_pairs=train_pairs, val_pairs=val_pairs, test_pairs=test_pairs)
    suite.options = dict(seed=seed, train_pairs=train_pairs, val_pairs=val_pairs, test_pairs=test_pairs)
    suite.model_factory = TransformerFactory(layout)
    return suite


def make_mha(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _images("mha", seed, train_pairs, val_pairs, test_pairs)


def make_timm(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _images("timm", seed, train_pairs, val_pairs, test_pairs)


def make_hf(*, seed: int = 0, train_samples: int = 1500, val_samples: int = 300, test_samples: int = 300):
    suite = get("sequences", seed=seed, train_samples=train_samples, val_samples=val_samples,
                test_samples=test_samples)
    suite.options = dict(seed=seed, train_samples=train_samples, val_samples=val_samples, test_samples=test_samples)
    suite.model_factory = TransformerFactory("hf")
    return suite

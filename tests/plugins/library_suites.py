"""Plugin suites whose trunks are the libraries' real classes, built as a user builds them
(random weights, small configs), not imitations:

- `make_timm_vit`: timm's `VisionTransformer` (embed 64, depth 2, 4 heads, patch 2).
- `make_timm_convnext`: timm's `ConvNeXt` (LayerNorm2d, depthwise 7×7, layer scale).
- `make_timm_mobilenetv3`: timm's `mobilenetv3_small_050` (squeeze-excitation, hard-swish).
- `make_tv_resnet`: torchvision's `ResNet` (BasicBlock, one block a stage), a 1-channel stem.
- `make_bert`: transformers' `BertModel` (hidden 64, 2 layers, 4 heads), mean pooling.

Images come from a small `multidigits` (1×10×10), token ids from a small `sequences` suite.
`prunefuse search --suite tests.plugins.library_suites:make_timm_vit`.
"""
from __future__ import annotations

from torch import nn

from mtl_models.models import MTLModel, imports
from mtl_models.suites import get


class Pooled(nn.Module):
    """A Hugging Face encoder's mean last hidden state over the tokens."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids=input_ids.long()).last_hidden_state.mean(dim=1)


def timm_vit(suite):
    timm = imports.timm()
    c, h, _ = suite.input_shape
    return timm.models.VisionTransformer(img_size=h, patch_size=2, in_chans=c, num_classes=0, embed_dim=64, depth=2,
                                         num_heads=4, mlp_ratio=2.0), 64


def timm_convnext(suite):
    timm = imports.timm()
    return timm.models.ConvNeXt(in_chans=suite.input_shape[0], num_classes=0, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                patch_size=1), 64


def timm_mobilenetv3(suite):
    model = imports.timm().create_model("mobilenetv3_small_050", pretrained=False, num_classes=0,
                                        in_chans=suite.input_shape[0])
    return model, model.head_hidden_size


def tv_resnet(suite):
    imports.torchvision()  # first: torchvision beside the CPU torch
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1])
    model.conv1 = nn.Conv2d(suite.input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Identity()
    return model, 512


def bert(suite):
    transformers = imports.transformers()
    vocab = int(max(int(s.x.max()) for s in (suite.train, suite.val, suite.test))) + 1
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=suite.input_shape[0])
    return Pooled(transformers.BertModel(config, add_pooling_layer=False)), 64


TRUNKS = {"timm_vit": timm_vit, "timm_convnext": timm_convnext, "timm_mobilenetv3": timm_mobilenetv3,
          "tv_resnet": tv_resnet, "bert": bert}


class LibraryFactory:
    """model_factory(suite, trunk=..., **spec): a class, so the suite pickles into Ray tasks."""

    def __init__(self, which: str):
        self.which = which

    def __call__(self, suite, trunk: str = "mlp"):
        body, width = TRUNKS[self.which](suite)
        return MTLModel(body, {t.name: nn.Linear(width, t.num_outputs) for t in suite.tasks})


def _images(which, seed, train_pairs, val_pairs, test_pairs):
    suite = get("multidigits", seed=seed, train_pairs=train_pairs, val_pairs=val_pairs, test_pairs=test_pairs)
    suite.options = dict(seed=seed, train_pairs=train_pairs, val_pairs=val_pairs, test_pairs=test_pairs)
    suite.model_factory = LibraryFactory(which)
    return suite


def make_timm_vit(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _images("timm_vit", seed, train_pairs, val_pairs, test_pairs)


def make_timm_convnext(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _images("timm_convnext", seed, train_pairs, val_pairs, test_pairs)


def make_timm_mobilenetv3(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _images("timm_mobilenetv3", seed, train_pairs, val_pairs, test_pairs)


def make_tv_resnet(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _images("tv_resnet", seed, train_pairs, val_pairs, test_pairs)


def make_bert(*, seed: int = 0, train_samples: int = 1500, val_samples: int = 300, test_samples: int = 300):
    suite = get("sequences", seed=seed, train_samples=train_samples, val_samples=val_samples,
                test_samples=test_samples)
    suite.options = dict(seed=seed, train_samples=train_samples, val_samples=val_samples, test_samples=test_samples)
    suite.model_factory = LibraryFactory("bert")
    return suite

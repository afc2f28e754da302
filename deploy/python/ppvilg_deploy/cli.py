"""The sampler options of the command lines (tools/infer.py over a checkpoint, deploy/python/infer.py over an
export): one flag per SamplerSettings field; a flag not given keeps the model's default (the checkpoint's Eval
section, or the export's inference.yml)."""
from ppvilg_deploy.decoding import (CAPTION_METHODS, IMAGE_DECODINGS, RERANK_SCORES, SamplerSettingError,
                                    SamplerSettings)

# flag -> (SamplerSettings field, type, help); every field has one (tests/test_generation.py checks)
FLAGS = {
    "--num": ("candidates", int, "text->image: images to sample per prompt"),
    "--temperature": ("temperature", float, "sampling temperature (0: always the most likely token)"),
    "--top-k": ("top_k", int, "keep the k most likely tokens (0: off)"),
    "--top-p": ("top_p", float, "nucleus sampling: keep the smallest set with this much probability (1: off)"),
    "--cfg-scale": ("cfg_scale", float, "text->image: classifier-free guidance scale (1: off)"),
    "--seed": ("seed", int, "sampling seed"),
    "--decoding": ("decoding", str, "text->image: sequential (one code per forward) or sjd (speculative Jacobi "
                   "decoding: several codes per forward, the same distribution)"),
    "--sjd-window": ("sjd_window", int, "text->image with --decoding sjd: draft codes per forward"),
    "--method": ("caption_method", str, f"caption / answer decoding: {', '.join(CAPTION_METHODS)}"),
    "--beam-size": ("beam_size", int, "beam search: beams per image"),
    "--length-penalty": ("length_penalty", float, "beam search: score = log-prob / length ** penalty"),
    "--max-len": ("max_len", int, "caption / answer: at most this many tokens (default: the model's text length)"),
    "--rerank-score": ("rerank_score", str, "text->image with several candidates: rank them by the sum of the "
                       "prompt's token log-probabilities given each image (logprob) or of its token probabilities "
                       "(token_prob)"),
}


def add_sampler_arguments(parser, defaults_from):
    """Add the sampler flags; `defaults_from` says where unset ones come from (shown in --help)."""
    group = parser.add_argument_group(f"sampler (an option not given takes its default from {defaults_from})")
    for flag, (field, kind, text) in FLAGS.items():
        extra = {"caption_method": {"choices": CAPTION_METHODS},
                 "decoding": {"choices": IMAGE_DECODINGS},
                 "rerank_score": {"choices": RERANK_SCORES}}.get(field, {})
        group.add_argument(flag, dest=field, type=kind, default=None, help=text, **extra)


def sampler_changes(args):
    """{field: value} of the sampler flags given on the command line."""
    return {field: getattr(args, field) for field, _, _ in FLAGS.values() if getattr(args, field) is not None}


def apply_sampler_flags(settings, args):
    """`settings` (the model's defaults) with the flags given; a value out of range is a ValueError naming the
    flag."""
    try:
        return settings.replace(**sampler_changes(args))
    except SamplerSettingError as e:
        flag = next(flag for flag, (field, _, _) in FLAGS.items() if field == e.field)
        raise ValueError(e.named(flag)) from None


def check_arguments(parser, args):
    """Before any model is loaded: --text / --image / --question (one of the first two, none of them empty)
    and the sampler flags' ranges; a problem exits 2 naming the option."""
    try:
        apply_sampler_flags(SamplerSettings(), args)
    except ValueError as e:
        parser.error(str(e))
    for name in ("text", "image", "question"):
        value = getattr(args, name)
        if value is not None and not value.strip():
            parser.error(f"--{name} is empty")
    if (args.text is None) == (args.image is None):
        parser.error("give either --text (text->image) or --image (captioning / VQA with --question)")
    if args.question is not None and args.image is None:
        parser.error("--question needs --image")

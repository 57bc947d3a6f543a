"""Generate a tiny, deterministic Qwen3 checkpoint + tokenizer for tests and demos.

The model has random weights (no training), but its init is scaled so that greedy
decoding is well defined: top-1/top-2 logit gaps are far above fp32 noise and the
output depends on the prompt. Everything is derived from constants in this file,
so two builds give byte-identical folders, and the cache folder name is a hash of
that spec.

Example::

    from vllm_cascade.testing.tiny_model import build_tiny_qwen3
    path = build_tiny_qwen3()            # cached under ~/.cache/vllm_cascade
    from vllm import LLM, SamplingParams
    llm = LLM(model=str(path), dtype="float32", max_model_len=1024, enforce_eager=True)
    print(llm.generate(["Hello world"], SamplingParams(max_tokens=8, temperature=0)))

(vLLM spawns its engine process, so in a script put this under
``if __name__ == "__main__":``.)

CLI: ``python -m vllm_cascade.testing.tiny_model [--out DIR] [--untied]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import uuid

import torch

# Bump whenever the output of the generator changes for the same spec, so cached
# folders from an older generator are not reused.
GENERATOR_VERSION = 1
SEED = 1234
VOCAB_TARGET = 4096  # BPE may stop earlier when the corpus runs out of merges.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MARKER = ".complete"

ARCH: dict = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
}

# Std of each weight is gain / sqrt(fan_in) (embeddings: absolute std). With the
# usual std=0.02 everywhere, logits come out nearly flat (std ~0.3), so greedy
# decoding is dominated by near-ties. A larger embedding/lm_head std gives logits
# with std ~5. With tied embeddings the residual stream still carries the current
# token's embedding, so greedy tends to echo it ("volcano volcano ..."); larger
# block outputs and sharper attention (q/k-norm weight > 1) make the next token
# depend on the context instead.
INIT: dict = {
    "embed_std": 0.3,
    "lm_head_std": 0.3,
    "qkv_gain": 1.0,
    "o_gain": 3.0,
    "up_gain": 1.0,
    "down_gain": 3.0,
    "qk_norm_weight": 3.0,
}

# For deep real configs (28+ layers): the gains above make a deep random network
# chaotic (bf16 rounding flips the first greedy token between two correct
# backends). Unit gains keep it stable; lm_head std 0.15 still gives logits of
# std ~5 at hidden 1024, i.e. peaked next-token distributions.
DEEP_INIT: dict = {**INIT, "embed_std": 0.15, "lm_head_std": 0.15, "o_gain": 1.0, "down_gain": 1.0,
                   "qk_norm_weight": 1.0}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the gate.
Hello world! This is a small test of the tokenizer, and it should handle punctuation.
The cat sat on the mat and looked out of the window at the birds in the garden.
A journey of a thousand miles begins with a single step, or so the old saying goes.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
In the beginning there was nothing but darkness, and then someone turned on the lights.
Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on mountains.
The library opens at nine in the morning and closes at six in the evening on weekdays.
My favourite colours are blue, green, and a very particular shade of orange.
Please remember to bring your passport, your ticket, and a warm jacket for the trip.
The train to London leaves from platform four at a quarter past ten.
Computers process information using binary digits called bits, which are either zero or one.
A neural network learns by adjusting its weights to reduce the error on training examples.
The scheduler decides which requests run next and how much memory each one receives.
Large language models predict the next token given all of the tokens that came before.
Attention lets every position look at every earlier position and mix their values.
The cache stores keys and values so that old tokens do not have to be recomputed.
When the batch is full, new requests wait in the queue until a slot becomes free.
Speculative decoding drafts several tokens cheaply and then verifies them in one pass.
The prefix of a prompt is often shared, so its cached blocks can be reused many times.
Once upon a time, in a kingdom by the sea, there lived a princess who loved mathematics.
The dragon slept on a pile of gold coins, dreaming of rain and thunder and distant stars.
Every morning the baker wakes before dawn to prepare bread, rolls, and sweet pastries.
The children played football in the park until their parents called them home for dinner.
He opened the old wooden box and found a letter, a key, and a faded photograph.
Rivers flow from the mountains to the ocean, carving valleys through rock over millions of years.
The moon orbits the earth roughly once a month, and the earth orbits the sun once a year.
Photosynthesis turns sunlight, water, and carbon dioxide into sugar and oxygen.
Elephants are the largest land animals, and they can remember friends for many years.
Honey never spoils, because its low water content makes it hard for bacteria to grow.
The recipe calls for two cups of flour, one egg, a pinch of salt, and a spoon of butter.
Mix the ingredients slowly, then bake the cake for thirty minutes in a hot oven.
To make tea, boil the water, warm the pot, add the leaves, and wait for four minutes.
Is it going to rain tomorrow? The forecast says there is a chance of light showers.
What time is it? It is half past three, so we still have an hour before the meeting.
Why is the sky blue? Sunlight is scattered by the air, and blue light scatters the most.
Where did you put my keys? I think they are on the kitchen table next to the newspaper.
How many people live in this city? About two million, and the number grows every year.
Thank you very much for your help yesterday; I could not have finished without you.
I am sorry, but I do not understand the question. Could you please explain it again?
Good morning, everyone. Today we will talk about history, science, music, and art.
The museum has paintings, sculptures, ancient coins, and a skeleton of a dinosaur.
Music can make people feel happy, sad, calm, or excited, sometimes all in one song.
The piano has eighty eight keys, some black and some white, arranged in a repeating pattern.
Chess is a game of strategy in which each player tries to trap the opposing king.
The election results will be announced tonight after all of the votes have been counted.
The company reported higher profits this quarter, thanks to strong sales overseas.
Doctors recommend drinking enough water, sleeping well, and walking every day.
The hospital opened a new wing for children, with bright rooms and a small playground.
Students should read the chapter carefully and answer the questions at the end.
The teacher wrote an equation on the board: two plus two equals four.
Numbers like 7, 42, 100, 2024 and 3.14159 appear in many examples and puzzles.
The meeting is scheduled for Monday, 9:30 AM, in room 12B on the second floor.
Send an email to the team with the report attached, and copy the manager as well.
def add(a, b): return a + b  # a tiny function written in Python
for i in range(10): print(i * i)
if x > 0 and y < 5: result = x - y else: result = None
The function returns a list of strings, each one sorted in alphabetical order.
Errors should never pass silently, unless they are explicitly silenced.
Simple is better than complex, and complex is better than complicated.
The server responded with status code 200, and the body contained a JSON object.
Open the file, read each line, split it on commas, and store the fields in a table.
Winter is cold and snowy, spring is green and wet, summer is hot, and autumn is golden.
The wind howled through the trees as the storm moved slowly across the valley.
A rainbow appeared after the rain, stretching from one side of the hill to the other.
The ship sailed north for seven days before the sailors finally saw land again.
Mountains, forests, deserts, islands, and lakes make the country a beautiful place to visit.
The detective examined the footprints and concluded that the thief had left through the window.
Nobody knew who had written the mysterious note, but everyone had a theory about it.
She laughed, closed her book, and said that the ending was better than she expected.
They walked along the beach, collecting smooth stones and talking about the future.
Reading every day improves vocabulary, concentration, and imagination.
The small robot rolled across the floor, beeped twice, and turned toward the door.
Engineers tested the bridge carefully before it was opened to cars and trucks.
The price of apples, bananas, cherries, and grapes went up after the dry summer.
Our neighbours have a friendly dog named Biscuit and a shy grey cat named Pepper.
Can you tell me a story about a brave mouse who saved the whole village?
Yes, of course. Long ago, a tiny mouse noticed that the river was rising quickly.
The answer is simple: practice a little every day, and you will slowly get better.
Astronomers use giant telescopes to study galaxies, nebulae, comets, and faraway planets.
The volcano erupted without warning, sending ash and glowing lava down its steep slopes.
Penguins cannot fly, but they are excellent swimmers and can dive surprisingly deep.
Gardeners plant tulips in autumn so that the bulbs bloom brightly in early spring.
The orchestra tuned their violins, cellos, flutes, and trumpets before the concert began.
Architects designed the tower with glass walls, steel beams, and a rooftop garden.
My grandmother knitted a woollen scarf, a pair of mittens, and a cosy blanket.
Farmers harvest wheat, barley, corn, and potatoes at the end of the growing season.
The astronaut floated weightlessly inside the station, watching sunrise through the porthole.
Customers queued outside the bakery because the croissants were famous across town.
Hikers followed the narrow trail past waterfalls, caves, and meadows full of wildflowers.
The professor explained quantum mechanics using coins, dice, and a spinning umbrella.
Journalists interviewed witnesses, checked documents, and published the investigation.
The puppy chewed the slipper, knocked over a vase, and then fell asleep on the sofa.
Electric cars need charging stations, efficient batteries, and reliable software.
The village celebrates its harvest festival with lanterns, dancing, and fireworks.
Thunderstorms are common in summer, when warm humid air rises quickly into the clouds.
The lighthouse keeper climbed one hundred steps every evening to light the lamp.
Volunteers cleaned the beach, recycled plastic bottles, and planted young trees.
The spacecraft transmitted photographs of icy moons, rings, and swirling storms.
Our hotel overlooked the harbour, where fishing boats unloaded crates of mackerel.
Firefighters rescued a kitten stuck high in an oak tree behind the supermarket.
The pharmacist measured the medicine carefully and explained the dosage twice.
Owls hunt at night, using keen hearing and silent feathers to catch their prey.
Programmers debug code by reading logs, writing tests, and asking thoughtful questions.
Variables, loops, conditionals, and recursion are fundamental ideas in programming.
The compiler translates source code into machine instructions that processors execute.
Databases organise records into tables with rows, columns, indexes, and constraints.
Encryption protects private messages by scrambling them with mathematical keys.
Memory bandwidth often limits performance more than raw arithmetic throughput.
Kernels launched on accelerators run thousands of lightweight threads in parallel.
Tokenizers split text into pieces, and each piece is mapped to an integer identifier.
Sampling with temperature zero always chooses the most probable next token.
The cascade sends easy prompts to a small model and hard prompts to a larger one.
Latency, throughput, and accuracy must be balanced when deploying machine learning systems.
Squirrels gather acorns and chestnuts, hiding them carefully before winter arrives.
The marathon runners jogged through tunnels, across bridges, and along the riverbank.
Chocolate, vanilla, strawberry, pistachio, and mango were the flavours on offer.
Grandfather repaired the bicycle, oiled the chain, and pumped up both tyres.
The submarine descended slowly into the trench, its searchlights revealing strange fish.
Volcanoes, earthquakes, glaciers, and erosion continually reshape the planet's surface.
Birthday parties usually include balloons, candles, presents, games, and laughter.
The carpenter sanded the table, stained the wood, and polished it until it gleamed.
Parliament debated the proposal for hours before finally approving the new budget.
Whales communicate over enormous distances using low, mysterious underwater songs.
The exhibition featured impressionist landscapes, modern sculptures, and photography.
Bees visit flowers to collect nectar and pollen, helping fruit and vegetables grow.
Our flight was delayed because of fog, so we played cards at the airport cafe.
Philosophers have argued about knowledge, truth, justice, and beauty for centuries.
The quiz asked about capitals: Paris, Tokyo, Cairo, Ottawa, Canberra, and Lima.
Yesterday I bought oranges, lemons, tomatoes, cucumbers, onions, and fresh basil.
"""


def spec_hash(tie_word_embeddings: bool = True) -> str:
    """Hash of everything that determines the generated files."""
    spec = {
        "version": GENERATOR_VERSION,
        "seed": SEED,
        "vocab_target": VOCAB_TARGET,
        "special_tokens": SPECIAL_TOKENS,
        "config": {**ARCH, "tie_word_embeddings": tie_word_embeddings},
        "init": INIT,
        "chat_template": CHAT_TEMPLATE,
        "corpus": CORPUS,
    }
    blob = json.dumps(spec, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("CASCADE_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "vllm_cascade"


def _is_complete(path: pathlib.Path, digest: str) -> bool:
    try:
        return (path / MARKER).read_text().strip() == digest
    except OSError:
        return False


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),  # get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def _config(vocab_size: int, ids: dict[str, int], tie: bool) -> dict:
    arch = dict(ARCH)
    rope_theta = arch.pop("rope_theta")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **arch,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        # transformers 5 keeps RoPE settings only in `rope_parameters` (a legacy
        # top-level `rope_theta` is folded into it); vLLM 0.32 reads the same dict.
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "initializer_range": 0.02,
        "tie_word_embeddings": tie,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _unused_ids(tok, vocab_size: int) -> list[int]:
    """Ids the model should never emit: embedding padding, and byte tokens outside
    printable ASCII (they decode to partial UTF-8, i.e. U+FFFD, or control chars)."""
    n = tok.get_vocab_size()
    # In byte-level BPE, printable ASCII bytes are their own char; space, \n and \t
    # are remapped to these three. Any other char stands for an unwanted byte.
    ok = {chr(c) for c in range(0x21, 0x7F)} | {"\u0120", "\u010a", "\u0109"}
    bad = [i for t, i in tok.get_vocab().items() if t not in SPECIAL_TOKENS and set(t) - ok]
    return sorted(bad) + list(range(n, vocab_size))


def _weights(cfg: dict, unused_ids: list[int], init: dict = INIT) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, dtype=torch.float32) * std

    def linear(out_f: int, in_f: int, gain: float) -> torch.Tensor:
        return normal(out_f, in_f, gain / in_f**0.5)

    def vocab_matrix(std: float) -> torch.Tensor:
        w = normal(cfg["vocab_size"], h, std)
        w[unused_ids] = 0  # logit exactly 0: far below the top logits, never chosen
        return w

    ones = lambda n: torch.ones(n, dtype=torch.float32)  # noqa: E731
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": vocab_matrix(init["embed_std"])}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = ones(h)
        w[p + "post_attention_layernorm.weight"] = ones(h)
        w[p + "self_attn.q_proj.weight"] = linear(nq * hd, h, init["qkv_gain"])
        w[p + "self_attn.k_proj.weight"] = linear(nkv * hd, h, init["qkv_gain"])
        w[p + "self_attn.v_proj.weight"] = linear(nkv * hd, h, init["qkv_gain"])
        w[p + "self_attn.o_proj.weight"] = linear(h, nq * hd, init["o_gain"])
        w[p + "self_attn.q_norm.weight"] = ones(hd) * init["qk_norm_weight"]
        w[p + "self_attn.k_norm.weight"] = ones(hd) * init["qk_norm_weight"]
        w[p + "mlp.gate_proj.weight"] = linear(inter, h, init["up_gain"])
        w[p + "mlp.up_proj.weight"] = linear(inter, h, init["up_gain"])
        w[p + "mlp.down_proj.weight"] = linear(h, inter, init["down_gain"])
    w["model.norm.weight"] = ones(h)
    # Drawn even when tied, so tied/untied share every other tensor.
    lm_head = vocab_matrix(init["lm_head_std"])
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lm_head
    return w


def _write_model(out: pathlib.Path, tie: bool) -> None:
    from safetensors.torch import save_file

    tok = _train_tokenizer()
    n_tokens = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    # Padding the embedding to a multiple of 64, as real checkpoints do.
    cfg = _config(-(-n_tokens // 64) * 64, ids, tie)

    def dump(name: str, obj: dict) -> None:
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")

    dump("config.json", cfg)
    dump("generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })
    tok.save(str(out / "tokenizer.json"))
    dump("tokenizer_config.json", {
        # Not "Qwen2Tokenizer": in transformers 5 that class rebuilds Qwen's own
        # pre-tokenizer; the generic fast class uses tokenizer.json as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,  # like Qwen: no BOS is prepended to prompts
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": ARCH["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    weights = _weights(cfg, _unused_ids(tok, cfg["vocab_size"]))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates it 0600; caches may be shared


def write_random_checkpoint(config_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            dtype: torch.dtype = torch.bfloat16, num_hidden_layers: int | None = None) -> pathlib.Path:
    """A real Qwen3 config (e.g. Qwen3-0.6B) with this module's scaled random init.

    vLLM's `load_format="dummy"` draws weights so small that every logit is ~0
    (uniform next-token distribution), which makes backend comparisons vacuous;
    these weights give peaked, prompt-dependent distributions. No tokenizer: use
    token-id prompts with `skip_tokenizer_init=True`. `num_hidden_layers`
    overrides the config's depth (same width, fewer layers: a small checkpoint of
    a large model's shapes). `out_dir` is reused only if its marker holds the hash
    of the same config, dtype and init; otherwise it is written again.
    """
    from safetensors.torch import save_file

    out = pathlib.Path(out_dir)
    cfg = json.loads((pathlib.Path(config_dir) / "config.json").read_text())
    if num_hidden_layers is not None:
        cfg["num_hidden_layers"] = num_hidden_layers
    spec = {"version": GENERATOR_VERSION, "seed": SEED, "init": DEEP_INIT, "dtype": str(dtype), "config": cfg}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    if _is_complete(out, digest):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    weights = {k: v.to(dtype) for k, v in _weights(cfg, unused_ids=[], init=DEEP_INIT).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    (out / MARKER).write_text(digest + "\n")  # written last: marks a complete checkpoint
    return out


def build_tiny_qwen3(
    out_dir: str | os.PathLike | None = None, *, tie_word_embeddings: bool = True
) -> pathlib.Path:
    """Build (or reuse) the tiny Qwen3 folder and return its path.

    ``out_dir=None`` uses ``$CASCADE_CACHE`` (default ``~/.cache/vllm_cascade``)
    / ``tiny-qwen3-<spec hash[:12]>``. A folder is reused only if its marker file
    holds the same spec hash. Files are written to a sibling temp dir that is
    renamed into place, so concurrent builders never see a partial model.
    """
    digest = spec_hash(tie_word_embeddings)
    if out_dir is None:
        final = default_cache_dir() / f"tiny-qwen3-{digest[:12]}"
    else:
        final = pathlib.Path(out_dir)
    final = final.expanduser().absolute()
    if _is_complete(final, digest):
        return final
    if final.exists() and any(final.iterdir()) and not (final / MARKER).exists():
        raise FileExistsError(f"{final} is not empty and was not made by build_tiny_qwen3")

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_model(tmp, tie_word_embeddings)
        (tmp / MARKER).write_text(digest + "\n")  # written last: marks a complete build
        if (final / MARKER).exists() and not _is_complete(final, digest):
            # Our own build of another spec (explicit out_dir): move it aside, swap ours in.
            stale = tmp.with_name(tmp.name + "-stale")
            with contextlib.suppress(OSError):  # another builder may have moved it already
                os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)  # atomic; also replaces an empty dir
        except OSError:
            if not _is_complete(final, digest):  # lost a race only if the winner is valid
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: cache dir)")
    parser.add_argument("--untied", action="store_true", help="separate lm_head weights")
    args = parser.parse_args(argv)
    print(build_tiny_qwen3(args.out, tie_word_embeddings=not args.untied))


if __name__ == "__main__":
    main()

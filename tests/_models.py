"""Small models built in-process for tests (no downloads)."""

import torch
import transformers


def word_tokenizer(words):
    """A word-level fast tokenizer over `words` (bos = eos = id 0, [UNK] = 1, no pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="[UNK]"
    )


def tiny_gpt2(words, n_layer=2):
    """A GPT-2 with `n_layer` blocks and a word-level fast tokenizer over `words` (bos = eos, no pad)."""
    tok = word_tokenizer(words)
    vocab = tok.get_vocab()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=len(vocab), n_positions=64)
    return transformers.GPT2Model(cfg), tok


def tiny_gpt2_lm(words, n_layer=1, says=None):
    """A tiny GPT-2 with a language-model head (it can `generate`) and its tokenizer. With `says` (a word of
    `words`) the final layer norm is rigged so greedy decoding always emits that word."""
    tok = word_tokenizer(words)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=512,
                                  bos_token_id=0, eos_token_id=0)
    lm = transformers.GPT2LMHeadModel(cfg)
    if says is not None:
        with torch.no_grad():
            wte = lm.transformer.wte.weight  # tied to the LM head
            row = wte[tok.get_vocab()[says]].clone()
            lm.transformer.ln_f.weight.zero_()
            lm.transformer.ln_f.bias.copy_(row / row.norm() * 50)  # logits = wte @ bias: `says` wins
            wte[tok.get_vocab()[says]] = row / row.norm() * 3 * wte.norm(dim=1).max()
    lm.eval()
    return lm, tok

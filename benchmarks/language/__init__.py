"""The language benchmark (issue 20): a Llama decoder and BPE tokenizer trained here on real text from wheels,
fully fine-tuned on 8 tasks (4 generative, 4 classification), saved as LLMs ship (bf16 shards), and tallzip's
representations, the paper's NLP merging rows and the rivals (BitDelta-style, BitX-style, zipnn) measured on
those files.

    pip install torch==2.13.0 -e '.[lang]'
    python -m benchmarks.language                  # the `cpu` family: build (cached) + every row + report
    python -m benchmarks.language --config small   # a quicker, smaller family
    python -m benchmarks.language --report-only    # redraw tables and plots from benchmarks/results/language.json

Corpora (corpora.py has the table): gensim 4.4.0's bundled test data (Wikipedia articles, text8, the Lee news
corpus, 20 Newsgroups messages, the word-analogy questions, Pang & Lee polarity sentences), Django 5.2.20's
Python source and its translation catalogues (django/**/locale/LANG/LC_MESSAGES/django.po), Faker 40.54.0's
per-locale name lists. All ship inside the wheels; nothing is downloaded (HF_HUB_OFFLINE=1).

Modules: corpora (the text), family (tokenizer, model, pretraining, fine-tunes, the cache), scoring (evaluate
a state dict or folder on a task; `benchmarks.language.scoring:evaluate`), rows (the measurements, through
tallzip's public API and CLI), rivals, tallness (why TALL masks do poorly here), report (tables, plots, JSON); lowbit (issue 22: the
below-two-bits points on this family, `python -m benchmarks.language.lowbit`).
"""

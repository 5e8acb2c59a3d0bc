#!/usr/bin/env python3
"""Turn the tagged Brown corpus (NLTK "form C": `word/tag` tokens) into plain text.

Usage: brown_to_text.py SRC_DIR DST_DIR

SRC_DIR holds the 500 Brown documents (files named c[a-r]NN); for each one a
file DST_DIR/cXNN.txt is written with the tags stripped and the tokens
rejoined with ordinary English spacing, one sentence per line and a blank
line between the paragraphs of the source.
"""

import os
import re
import sys

DOC_NAME = re.compile(r"^c[a-r][0-9]{2}$")

# Tokens that attach to the word before them (no space in front).
CLOSING = {".", ",", ";", ":", "?", "!", ")", "]", "}", "''", "'", "%"}
# Tokens that attach to the word after them (no space behind).
OPENING = {"(", "[", "{", "``", "`", "$"}
QUOTES = {"``": '"', "''": '"', "`": "'"}
# This copy of the corpus repeats some punctuation tokens (";/. ;/.", "?/. ?/.",
# "3/cd ,/, ,/,"); a repeat of one of these right after itself is dropped.
DEDUP = {";", "?", "!", ",", ":"}


def strip_tag(token):
    """`word/tag` -> `word`; the tag follows the last slash (words may hold slashes)."""
    cut = token.rfind("/")
    if cut <= 0:
        return token
    return token[:cut]


def detokenize(words):
    out = []
    glue_next = False
    prev = None
    for word in words:
        if word == prev and word in DEDUP:
            continue
        prev = word
        # "Jr./np ./." ends a sentence on an abbreviation: keep a single period.
        if word == "." and out and out[-1].endswith("."):
            continue
        text = QUOTES.get(word, word)
        if not out:
            out.append(text)
        elif glue_next or word in CLOSING:
            out[-1] += text
        else:
            out.append(text)
        glue_next = word in OPENING
    return " ".join(out)


def convert(src, dst):
    with open(src, "r", encoding="ascii", errors="replace") as handle:
        raw = handle.read()
    paragraphs = []
    current = []
    for line in raw.split("\n"):
        if not line.strip():
            if current:
                paragraphs.append(current)
                current = []
            continue
        words = [strip_tag(tok) for tok in line.split()]
        sentence = detokenize(words)
        if sentence:
            current.append(sentence)
    if current:
        paragraphs.append(current)
    text = "\n\n".join("\n".join(p) for p in paragraphs) + "\n"
    tmp = dst + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, dst)
    return sum(len(p) for p in paragraphs)


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    src_dir, dst_dir = argv[1], argv[2]
    names = sorted(n for n in os.listdir(src_dir) if DOC_NAME.match(n))
    if not names:
        sys.stderr.write(f"brown_to_text: no Brown documents (c[a-r]NN) in {src_dir}\n")
        return 1
    os.makedirs(dst_dir, exist_ok=True)
    sentences = 0
    for name in names:
        sentences += convert(os.path.join(src_dir, name), os.path.join(dst_dir, name + ".txt"))
    print(f"brown: {len(names)} documents, {sentences} sentences")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The seven HAM10000 diagnosis codes, in the fixed order used for every model output."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_TO_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)

# ISIC 2018 task 3 ground-truth columns -> HAM10000 codes.
ISIC_COLUMNS: dict[str, str] = {
    "MEL": "mel",
    "NV": "nv",
    "BCC": "bcc",
    "AKIEC": "akiec",
    "BKL": "bkl",
    "DF": "df",
    "VASC": "vasc",
}

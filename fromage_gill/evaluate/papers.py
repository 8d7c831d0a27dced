"""The papers' published figures, printed beside a run's (percent, as the papers print them).

FROMAGe (Koh et al., ICML 2023) Tables 1-2, GILL (Koh et al., NeurIPS 2023) Table 1 and MAGIC (Su et al., 2022)
Table 1; FROMAGe's VIST R@1 is the fixed script's 18.2 (the first version of the paper printed 15.6). Only the
figures a row names are known; the table leaves the others blank.
"""

from __future__ import annotations

VIST_SETTINGS = ("1 caption", "5 captions", "5 captions + 4 images")

PAPERS: dict[str, dict[str, dict[str, float]]] = {
    "vist-retrieval": {
        "FROMAGe paper: 5 captions + 4 images": {"R@1": 18.2, "R@5": 42.7, "R@10": 51.8},
        "GILL paper: 5 captions + 4 images": {"R@1": 20.3, "R@5": 45.0, "R@10": 53.7},
        "CLIP ViT-L/14 (paper): 5 captions + 4 images": {"R@1": 2.4, "R@5": 21.3, "R@10": 34.0},
    },
    "visdial-t2i": {
        "FROMAGe paper": {"R@1": 20.8, "R@5": 44.9, "R@10": 56.0},
        "CLIP ViT-L/14 (paper)": {"R@1": 17.7, "R@5": 38.9, "R@10": 50.2},
    },
    "visdial-rank": {},  # FROMAGe reports NDCG/MRR/R@k of this protocol in its appendix; not copied here
    "vist-generation": {},  # GILL reports CLIP similarity and LPIPS in a figure, not a table row we can quote
    "visdial-generation": {},
    "captioning": {
        "MAGIC paper: MSCOCO": {
            "B@1": 56.8,
            "B@4": 12.9,
            "METEOR": 17.4,
            "ROUGE-L": 39.9,
            "CIDEr": 49.3,
            "SPICE": 11.3,
        },
        "MAGIC paper: Flickr30k": {
            "B@1": 44.5,
            "B@4": 6.4,
            "METEOR": 13.1,
            "ROUGE-L": 31.6,
            "CIDEr": 20.4,
            "SPICE": 7.1,
        },
    },
}

"""Every analysis option's default, in one torch-free module: the library, the CLI's ``--help`` and the report read
them here (importing this costs nothing, so ``vitlens --help`` stays fast).

A default taken from a paper or a reference implementation says where from.
"""

from __future__ import annotations

# Figures.
FIGURE_FORMATS = ("png", "svg", "pdf")
FIGURE_FORMAT = "png"

# filters: the ViT paper's Fig. 7 (left) shows the first 28 principal components.
FILTERS_NUM_COMPONENTS = 28

# attention-distance: App. D.7 of the ViT paper averages over 128 example images.
ATTENTION_DISTANCE_NUM_IMAGES = 128
# Patch queries' weights rescaled to patches: weight on prefix tokens (no position) must not count as distance 0.
ATTENTION_DISTANCE_RENORMALIZE = True

# rollout: Abnar & Zuidema 2020 (and the ViT paper's App. D.8) average the heads and keep every weight.
ROLLOUT_HEAD_FUSION = "mean"
ROLLOUT_DISCARD_RATIO = 0.0
ROLLOUT_START_LAYER = 0
ROLLOUT_DATA_IMAGES = 8  # with --data and no --num-images: a handful of figures, not one per test image

# fewshot: big_vision's fewshot_lsr evaluator (shots 1, 5, 10, 25; l2_reg 2**10), three shot draws.
FEWSHOT_SHOTS: tuple[int, ...] = (1, 5, 10, 25)
FEWSHOT_SEEDS = 3
FEWSHOT_L2 = 2.0**10

# report: modest, so that the whole report on the demo model and digits takes seconds on two CPU cores.
REPORT_NUM_IMAGES = ATTENTION_DISTANCE_NUM_IMAGES
REPORT_ROLLOUT_IMAGES = 6
REPORT_SHOTS: tuple[int, ...] = (1, 5, 10)  # big_vision's 1, 5, 10 (25 left out: digits' test split is small)
REPORT_SEEDS = FEWSHOT_SEEDS
REPORT_L2 = FEWSHOT_L2

# features: the DINOv2 paper's PCA visualisation (Fig. 1): the first three components as RGB, after the last block
# (its final norm), foreground split on the first component.
FEATURES_LAYER = -1
FEATURES_NUM_COMPONENTS = 3
FEATURES_FOREGROUND = "auto"

# tokens: Darcet et al. 2023 ("Vision Transformers Need Registers") pick high-norm tokens from a bimodal norm
# histogram; "auto" finds that valley in the last layer (vitlens.analysis.tokens.auto_threshold).
TOKENS_NORM_THRESHOLD = "auto"
TOKENS_NUM_IMAGES = 128
# The registers paper shows the artefacts in the last layer's attention maps (its Figs. 1, 2 and 7).
TOKENS_IMAGE_LAYER = -1

# cka: the minibatch estimator of Nguyen, Raghu & Kornblith 2021 sums unbiased HSIC over minibatches. 256 images a
# minibatch is vitlens's choice (large enough that each minibatch's estimate is stable; it divides the 512 images of
# the benchmark); the default number of images is one minibatch, so by default CKA is the full-data unbiased
# estimate. mean-patch works for every layout (no class token needed) and costs one row per image.
CKA_TOKENS = "mean-patch"
CKA_MINIBATCH_SIZE = 256
CKA_NUM_IMAGES = 256

# explain: Chefer, Gur & Wolf 2021 (ICCV) attribution is the method their perturbation tests rank first; the class is
# the predicted one (as in their notebooks and vit-explain); the score is the class logit before softmax (both
# reference implementations back-propagate a one-hot on the logits). Discarding nothing matches rollout's default
# (vit-explain's grad-rollout example uses 0.9), so the methods compare on the same attention.
EXPLAIN_METHOD = "attribution"
EXPLAIN_CLASS = "pred"
EXPLAIN_SCORE = "logit"
EXPLAIN_DISCARD_RATIO = 0.0

# fewshot --probe knn: DINO's weighted k-NN (facebookresearch/dino, eval_knn.py: --nb_knn 10 20 100 200,
# --temperature 0.07); the default probe stays the ridge regression of the ViT paper.
FEWSHOT_PROBE = "lsr"
FEWSHOT_KNN_K: tuple[int, ...] = (10, 20, 100, 200)
FEWSHOT_KNN_TEMPERATURE = 0.07

# compare: attention distance and CKA of every checkpoint read the paper's 128 images (App. D.7); CKA then uses one
# minibatch of them (CKA_MINIBATCH_SIZE caps it), the full-data unbiased estimate.
COMPARE_NUM_IMAGES = ATTENTION_DISTANCE_NUM_IMAGES

# explain --faithfulness: Chefer, Gur & Wolf 2021 (CVPR) perturb in steps of 10 % of the patches; removing tokens
# from the sequence (drop) paints nothing out of distribution into the image. The random-order baseline's seed is
# recorded with the result. 32 images keep the sweep to seconds on the demo model; the papers use thousands.
FAITHFULNESS_METHODS: tuple[str, ...] = ("attribution", "grad-rollout", "last-layer", "rollout")
FAITHFULNESS_REMOVAL = "drop"
FAITHFULNESS_STEPS = 10
FAITHFULNESS_SEED = 0
FAITHFULNESS_NUM_IMAGES = 32

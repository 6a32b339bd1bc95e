"""BERT-family encoders with a sequence-classification head (BERT, RoBERTa, MiniLM, ...).

Blocks are the encoder layers; the embeddings, the pooler and the classifier
stay in floating point by default, as in the FlexRound paper's BERT setting
(and every anchor tool).
"""

from flexround_pl.models.adapter import Architecture, register

BERT = register(
    Architecture(
        name="bert",
        class_names=("BertForSequenceClassification",),
        block_path="bert.encoder.layer",
        keep_fp=(r"embeddings", r"pooler", r"classifier"),
    )
)

ROBERTA = register(
    Architecture(
        name="roberta",
        class_names=("RobertaForSequenceClassification", "XLMRobertaForSequenceClassification"),
        block_path="roberta.encoder.layer",
        keep_fp=(r"embeddings", r"classifier"),
    )
)

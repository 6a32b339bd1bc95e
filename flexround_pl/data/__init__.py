"""Data modules of the PTQ pipeline (calibration / train / eval splits plus metrics)."""

from flexround_pl.data.base import PTQDataModule
from flexround_pl.data.images import DigitsData, FashionMNISTData, ImageFolderData
from flexround_pl.data.language_modeling import LanguageModelingData
from flexround_pl.data.text_classification import TextClassificationData
from flexround_pl.data.webnlg import DataToTextData

__all__ = [
    "DataToTextData", "DigitsData", "FashionMNISTData", "ImageFolderData", "LanguageModelingData", "PTQDataModule", "TextClassificationData",
]

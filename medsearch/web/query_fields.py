"""The result-shaping fields /search, /similar and /export accept (and the upload forms, as
text): one row per group, a probability threshold, paging, near-copy removal, relevance
feedback; with the bounds a hostile request meets (4xx, never unbounded work)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema, field_validator

from retrieval.query import MAX_FEEDBACK
from retrieval.ranking import MAX_OFFSET
from retrieval.region import MAX_COORDINATE, Region

from ..app import MAX_ID


def _integral(value):
    """JSON's 12.0 is the integer 12 (as JSON Schema says); true is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


FeedbackId = Annotated[Annotated[int, Field(ge=0, le=MAX_ID)], BeforeValidator(_integral)]
Offset = Annotated[Annotated[int, Field(ge=0, le=MAX_OFFSET)], BeforeValidator(_integral)]
Coordinate = Annotated[Annotated[int, Field(ge=0, le=MAX_COORDINATE)], BeforeValidator(_integral)]
Extent = Annotated[Annotated[int, Field(ge=1, le=MAX_COORDINATE)], BeforeValidator(_integral)]


class QueryShape(BaseModel):
    """Fields shared by the query bodies (defaults keep a plain top-k search)."""

    distinct: Literal["patient", "study", "series"] | None = Field(
        None, description="one row per patient, study or series (its best-scoring image); k "
                          "counts groups; rows carry group_count")
    min_prob: float | None = Field(
        None, ge=0.0, le=1.0, description="every image whose SigLIP match probability for the "
                                          "text-only query is at least this (uncalibrated)")
    offset: Offset = 0
    dedupe: float | None = Field(
        None, ge=0.0, le=1.0, description="drop a row whose cosine to a higher-ranked kept row "
                                          "is at least this")
    relevant: list[FeedbackId] = Field(default_factory=list, max_length=MAX_FEEDBACK,
                                       description="relevance feedback: ids marked relevant",
                                       json_schema_extra={"uniqueItems": True})
    not_relevant: list[FeedbackId] = Field(default_factory=list, max_length=MAX_FEEDBACK,
                                           description="ids marked not relevant",
                                           json_schema_extra={"uniqueItems": True})
    region: tuple[Coordinate, Coordinate, Extent, Extent] | None = Field(
        None, description="[x, y, w, h]: only this box of the query image (its one image term), "
                    "embedded as a picture of its own")
    region_space: Literal["image", "preview"] = Field(
        "image", description="image: pixels of the displayed image; preview: pixels of the "
                             "S×S model view GET /images/{id}/preview shows (S: /stats image_size)")

    @field_validator("region", mode="before")
    @classmethod
    def _box_from_list(cls, value):
        """JSON has lists only; the strict models take the box's array as the tuple it is."""
        return tuple(value) if isinstance(value, list) else value

    def shape(self) -> dict:
        """The QuerySpec keyword arguments these fields stand for."""
        return {"distinct": self.distinct, "min_prob": self.min_prob, "offset": self.offset,
                "dedupe": self.dedupe, "relevant": list(self.relevant),
                "not_relevant": list(self.not_relevant),
                "region": Region.parse(self.region, self.region_space)}


_FORM_IDS = WithJsonSchema({"type": "string", "maxLength": 32 * 21,
                            "pattern": "^[0-9]{1,19}(,[0-9]{1,19}){0,31}$",
                            "description": "ids separated by commas, e.g. 5,7"})


class FormQueryShape(QueryShape):
    """The same as multipart form text: ids as "5,7"."""

    relevant: Annotated[list[FeedbackId], _FORM_IDS] = Field(default_factory=list,
                                                             max_length=MAX_FEEDBACK)
    not_relevant: Annotated[list[FeedbackId], _FORM_IDS] = Field(default_factory=list,
                                                                 max_length=MAX_FEEDBACK)

    region: Annotated[tuple[Coordinate, Coordinate, Extent, Extent] | None, WithJsonSchema({
        "type": "string",
        "pattern": "^[0-9]{1,7},[0-9]{1,7},0{0,6}[1-9][0-9]{0,6},0{0,6}[1-9][0-9]{0,6}$",
        "description": "x,y,w,h in pixels (w, h at least 1), e.g. 10,20,64,64"})] = None

    @field_validator("region", mode="before")
    @classmethod
    def _comma_box(cls, value):
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(","))
        return value

    @field_validator("relevant", "not_relevant", mode="before")
    @classmethod
    def _comma_ids(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

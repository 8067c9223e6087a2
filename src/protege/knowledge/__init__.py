"""What the teacher knows, in a typed form: ModelOutput, teachers, and the teacher-output cache."""
from .output import ModelOutput
from .teacher import Teacher, predict_logits

__all__ = ["ModelOutput", "Teacher", "predict_logits"]

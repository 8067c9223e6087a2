"""What the teacher knows, in a typed form: ModelOutput, hooked features, teachers, and the teacher-output cache."""
from .cache import TeacherCache, load_or_build_cache
from .features import extract, hooked, resolve, unwrap
from .output import ModelOutput
from .teacher import Teacher, predict_logits

__all__ = ["ModelOutput", "Teacher", "TeacherCache", "extract", "hooked", "load_or_build_cache", "predict_logits", "resolve", "unwrap"]

"""The official VQA evaluation code (GT-Vision-Lab/VQA), kept unmodified but for marked Python 3 fixes, as the
reference the VQA accuracy tests compare captune's implementation with; see the header of each file and LICENSE."""

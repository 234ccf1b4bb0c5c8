"""remus: Remus-style high availability for an unmodified Linux process."""
__version__ = "0.1.0"

"""trainer.users."""

"""Object discovery: ContraCAM, its boxes and masks, and their localization scores."""

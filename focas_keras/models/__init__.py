"""Models: backbone builder, FPN, the hybrid head and Mdet."""

"""Target assignment and losses of Mdet's anchor-based and anchor-free branches."""

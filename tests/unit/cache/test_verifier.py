"""The semantic hit verifier: what it must reject although the words match, and what it keeps."""
import pytest

from tidegate.core.cache.verifier import verify

SAME = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "What's the capital of France?"),
    ("Translate good morning into Spanish.", "Translate good morning to Spanish."),
    ("When will you deliver my order?", "When will you delivery my order?"),  # a form of one word
    ("In the morning, the support team answered all of the open tickets about delayed parcels and refunds.",
     "The support team answered all of the open tickets about delayed parcels and refunds in the morning."),
]
DIFFERENT = [
    ("Book a flight from New York to Florida.", "Book a flight from Florida to New York.", "entities"),
    ("How do I get from the airport to the hotel?", "How do I get from the hotel to the airport?", "order"),
    ("Transfer 500 dollars to savings.", "Transfer 50 dollars to savings.", "numbers"),
    ("Who won the 2018 World Cup?", "Who won the 2014 World Cup?", "numbers"),
    ("Is the museum open on Monday?", "Is the museum not open on Monday?", "negation"),
    ("I can log in to my account.", "I can't log in to my account.", "negation"),
    ("What is the weather in Paris today?", "What is the weather in London today?", "entities"),
    ("The dog bit the man.", "The man bit the dog.", "overlap"),
    ("In August, Higgins left Southampton for Cape Town.", "Higgins left Southampton for Cape Town in August.",
     "entities"),  # entities in a new order: possibly new roles, so not served
    ("Should I take the medicine before eating?", "Should I take the medicine after eating?", "antonym"),
    ("What is the maximum dose for adults?", "What is the maximum dose for children?", "antonym"),
    ("Is it safe to take ibuprofen daily?", "Is it dangerous to take ibuprofen daily?", "antonym"),
    ("How do I delete the file from the terminal?", "How do I create the file from the terminal?", "antonym"),
    ("Is it safe to mix bleach and ammonia?", "Is it safe to mix bleach and water?", "substitution"),
]


@pytest.mark.parametrize("a,b", SAME)
def test_paraphrases_pass(a, b):
    assert verify(a, b) == (True, "")


@pytest.mark.parametrize("a,b,why", DIFFERENT)
def test_changed_meaning_is_rejected_with_a_reason(a, b, why):
    assert verify(a, b) == (False, why)
